#!/usr/bin/env bash
# The one test command: installs what is missing, builds, type-checks and runs every test
# (unit, integration against real servers on loopback). Ends with a line "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
npm run --silent build
npm run --silent typecheck

report="$(mktemp -d)/vitest.json"
status=0
npx vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@" || status=$?

if [ -s "$report" ]; then
  node -e '
    const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const skipped = (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
    console.log(`tests: ${r.numPassedTests} passed, ${r.numFailedTests} failed` + (skipped ? `, ${skipped} skipped` : ""));
  ' "$report"
fi
rm -rf "$(dirname "$report")"
exit "$status"
