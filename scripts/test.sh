#!/usr/bin/env bash
# The one test command: installs what is missing, builds, type-checks, runs every unit and
# integration test (real servers on loopback), then the QEMU guest test. Ends with one line
# "tests: N passed, N failed" counting both.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
npm run --silent build
npm run --silent typecheck

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
report="$work/vitest.json"

status=0
npx vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@" || status=$?

passed=0
failed=0
if [ -s "$report" ]; then
  read -r passed failed < <(node -e '
    const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    console.log(`${r.numPassedTests} ${r.numFailedTests}`);
  ' "$report")
else
  failed=$((failed + 1))
fi
echo "vitest: $passed passed, $failed failed"

# The QEMU guest test (test/guest/README.md); skipped only when tests were filtered by arguments.
if [ "$#" -eq 0 ]; then
  gstatus=0
  scripts/guest-test.sh --no-build 2>&1 | tee "$work/guest.log" || gstatus=$?
  line="$(grep -E '^guest: [0-9]+ passed, [0-9]+ failed' "$work/guest.log" | tail -n 1 || true)"
  if [ -n "$line" ]; then
    gp="$(sed -E 's/^guest: ([0-9]+) passed.*/\1/' <<<"$line")"
    gf="$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")"
    passed=$((passed + gp))
    failed=$((failed + gf))
  fi
  if [ "$gstatus" -ne 0 ]; then
    status=1
    [ -n "$line" ] && [ "${gf:-0}" -gt 0 ] || failed=$((failed + 1))
  fi
fi

echo "tests: $passed passed, $failed failed"
exit "$status"
