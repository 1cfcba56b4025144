#!/usr/bin/env bash
# Soak (issue 8 §6; not part of the test run): mixed registry faults, load, optional SIGKILLs of
# the daemon, for a set time; prints a summary and exits 0 only on a clean run. Builds first.
#   scripts/soak.sh [--minutes N | --seconds N] [--concurrency C] [--kill-every S] [--seed N]
#                   [--snapshotter auto|copy|overlay] [--json FILE] …   (--help for all options)
set -euo pipefail
cd "$(dirname "$0")/.."
npm run --silent build
exec npx tsx test/soak/soak.ts "$@"
