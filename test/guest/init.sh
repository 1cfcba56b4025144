#!/bin/sh
# Guest /init of the guestpull QEMU test (busybox sh, PID 1). It plays the part of the guest's boot
# and of the kata agent: mounts the kernel filesystems and a tmpfs /run, loads the virtio and overlay
# modules, configures eth0 for QEMU user networking, starts `guestpull serve --initdata auto` the way
# the kata agent launches its data hub (a child process on the well-known socket), runs the agent
# stand-in (agent-client.mjs), stops the daemon and powers off. Everything goes to the serial console;
# lines starting with GUESTPULL- are read by test/guest/run.ts.
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export HOME=/root

APP=/opt/guestpull
SOCKET=unix:///run/confidential-containers/cdh.sock
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk overlay"

uptime_s() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "GUESTPULL-INIT {\"stage\":\"$1\",\"uptime\":$(uptime_s)${2:+,$2}}"; }
die() {
  echo "GUESTPULL-INIT-ERROR $*"
  echo 'GUESTPULL-GUEST-TEST-DONE {"passed":0,"failed":1,"error":"init"}'
  sync
  poweroff -f
  sleep 5
}
# The value of `key=` on the kernel command line ('' when absent).
cmdline_arg() {
  for w in $(cat /proc/cmdline); do
    case "$w" in "$1="*) echo "${w#*=}" ;; esac
  done
}

mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys || die "mount /sys"
mount -t devtmpfs devtmpfs /dev || die "mount /dev"
# /run holds the socket, the init-data directory, the layer work dir and the bundles: as in a kata
# guest it is RAM, and what the pulls leave there is what they cost the guest.
mount -t tmpfs -o mode=0755,size=80% tmpfs /run || die "mount /run"
mkdir -p /tmp /run/confidential-containers /run/kata-containers
chmod 1777 /tmp
mark mounted

for m in $MODULES; do
  insmod "/lib/modules/guest/$m.ko" || die "insmod $m"
done
mark modules

ip link set lo up || die "lo up"
ip addr add 10.0.2.15/24 dev eth0 || die "eth0 address (no virtio network card?)"
ip link set eth0 up || die "eth0 up"
ip route add default via 10.0.2.2 || die "default route"

# The init-data disk: virtio_blk probes asynchronously; wait (bounded) for its device node.
n=0
while [ ! -b /dev/vda ] && [ "$n" -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
[ -b /dev/vda ] || die "no /dev/vda (init-data disk)"
mark devices

# The test stands in for the TEE here: on real hardware the expected digest is the launch
# measurement's init-data field (SNP HOST_DATA, TDX MRCONFIGID), which the host cannot forge. This
# guest has no TEE, so the test passes the digest of the document it packed on the kernel command
# line. The host could change it, which is exactly why a real guest must not do this.
digest=$(cmdline_arg guestpull.initdata_digest)
[ -n "$digest" ] || die "guestpull.initdata_digest= missing from the kernel command line"

# Launched like the kata agent launches its helper: a child process, its output on the console,
# its exit status reported. The subshell reports the daemon's pid and, later, its exit code.
(
  node "$APP/dist/cli.js" serve --initdata auto --initdata-digest "$digest" --listen "$SOCKET" &
  echo $! > /run/guestpull.pid
  wait $!
  echo "GUESTPULL-DAEMON-EXIT {\"code\":$?,\"uptime\":$(uptime_s)}"
) &
launcher=$!
mark daemon-started

node "$APP/guest-test/agent-client.mjs" "$APP/guest-test/plan.json" /run/guestpull.pid
echo "GUESTPULL-CLIENT-EXIT {\"code\":$?,\"uptime\":$(uptime_s)}"

# Stop the daemon as the agent does at shutdown (SIGTERM), bounded; SIGKILL after 20 s.
pid=$(cat /run/guestpull.pid 2>/dev/null)
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  n=0
  while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 200 ]; do sleep 0.1; n=$((n + 1)); done
  kill -0 "$pid" 2>/dev/null && { echo "GUESTPULL-INIT-ERROR daemon ignored SIGTERM for 20 s"; kill -KILL "$pid"; }
fi
wait "$launcher"
mark poweroff
sync
poweroff -f
sleep 5
