#!/usr/bin/env bash
# The QEMU guest test (issue 6): boots a Debian kernel under TCG with an initramfs holding
# busybox, node and the built project, hands it init-data on a virtio disk, and has an agent
# stand-in pull images through a proxy and check the bundles (see test/guest/run.ts).
#   scripts/guest-test.sh [--no-build] [--verbose]
# Installs what is missing (qemu-system-x86, busybox-static; the registry and squid through
# scripts/install-deps.sh), fetches the kernel package into .cache/guest/ without touching /boot
# (apt-get download + dpkg -x, reused on later runs), builds, and runs the test.
# Ends with "guest: N passed, N failed"; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
args=()
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    *) args+=("$a") ;;
  esac
done

cache=.cache/guest
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk overlay)

say() { echo "guest-test: $*" >&2; }
fail() { say "$*"; echo "guest: 0 passed, 1 failed"; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

apt_install() {
  is_root || fail "missing Debian packages: $* (run as root, or: sudo apt-get install $*)"
  say "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- host packages -----------------------------------------------------------------------------
scripts/install-deps.sh
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
# The guest needs a static busybox (the initramfs carries no libc for it).
if ! [ -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
command -v strip >/dev/null 2>&1 || missing+=(binutils)
[ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"

# --- kernel and modules, cached --------------------------------------------------------------
mkdir -p "$cache"
# The versioned package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
if [ -z "$kpkg" ] && is_root; then
  apt-get update -qq || true
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
fi
if [ -n "$kpkg" ]; then
  kdir="$cache/kernel-${kpkg#linux-image-}"
else
  # No package lists (offline): use the newest kernel already in the cache.
  kdir=$(ls -d "$cache"/kernel-* 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$kdir" ] || fail "cannot find the kernel package linux-image-amd64 depends on (apt-cache), and no kernel is cached in $cache"
  say "apt-cache gave no kernel package; using the cached $kdir"
fi

if [ ! -f "$kdir/.complete" ]; then
  say "fetching $kpkg into $kdir (apt-get download + dpkg -x; /boot is not touched)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # apt's _apt sandbox user cannot write into a root-only temp dir: let it, then download.
  chmod 0755 "$tmp"
  (cd "$tmp" && apt-get download -q "$kpkg" >/dev/null 2>"$tmp/apt.err") || {
    is_root && apt-get update -qq && (cd "$tmp" && apt-get download -q "$kpkg" >/dev/null 2>"$tmp/apt.err")
  } || fail "apt-get download $kpkg failed: $(tail -n 3 "$tmp/apt.err")"
  dpkg -x "$tmp"/"$kpkg"_*.deb "$tmp/x"
  rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp/modules"
  cp "$tmp"/x/boot/vmlinuz-* "$kdir.tmp/vmlinuz"
  for m in "${modules[@]}"; do
    f=$(find "$tmp/x" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) -print | head -n 1)
    [ -n "$f" ] || fail "module $m not found in $kpkg"
    case "$f" in
      *.ko.xz) xz -dc "$f" > "$kdir.tmp/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" > "$kdir.tmp/modules/$m.ko" ;;
      *.ko.gz) gzip -dc "$f" > "$kdir.tmp/modules/$m.ko" ;;
      *) cp "$f" "$kdir.tmp/modules/$m.ko" ;;
    esac
  done
  echo "$kpkg" > "$kdir.tmp/.complete"
  # Keep the cache small: one kernel (vmlinuz + ten modules), nothing of the package.
  rm -rf "$kdir" && mv "$kdir.tmp" "$kdir"
  for old in "$cache"/kernel-*; do [ "$old" = "$kdir" ] || rm -rf "$old"; done
  rm -rf "$tmp"
  trap - EXIT
fi

# --- build and run -------------------------------------------------------------------------------
if [ "$build" -eq 1 ]; then
  npm run --silent build || fail "npm run build failed"
fi
exec node_modules/.bin/tsx test/guest/run.ts --kernel-dir "$kdir" --cache-dir "$cache" "${args[@]}"
