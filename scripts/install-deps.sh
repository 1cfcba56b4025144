#!/usr/bin/env bash
# Installs what guestpull's build, tests and demo need, only where it is missing:
#   Debian packages: the real servers and peers the tests run against, and ISA-L (libisal-dev)
#     for the native addon's gunzip;
#   npm packages: from package-lock.json.
# Idempotent; safe to run on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."

# command → Debian package that provides it
declare -A NEED=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [umoci]=umoci
  [squid]=squid
  [openssl]=openssl
  [setpriv]=util-linux
  [htpasswd]=apache2-utils
  [unshare]=util-linux
  [mount]=mount
  [zstd]=zstd
)
# file → Debian package that provides it (packages with no command)
declare -A NEED_FILE=(
  # ISA-L's igzip header: the native addon's gunzip builds against it and dlopens libisal.so.2
  [/usr/include/isa-l/igzip_lib.h]=libisal-dev
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${NEED[$cmd]}")
done
for file in "${!NEED_FILE[@]}"; do
  [ -e "$file" ] || missing+=("${NEED_FILE[$file]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "install-deps: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts no services in this environment, but make sure nothing we installed listens.
  for svc in docker-registry squid; do
    if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  done
fi

stamp=node_modules/.guestpull-installed
if [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ]; then
  echo "install-deps: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error
  touch "$stamp"
fi
