#!/usr/bin/env bash
# Quick start: a loopback registry seeded with a sample image built by this repo, the daemon on a
# temporary unix socket, one PullImage call through a real gRPC client, the bundle shown, all stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
npm run --silent build
exec npx tsx scripts/demo.ts "$@"
