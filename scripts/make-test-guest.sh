#!/usr/bin/env bash
# Builds a test VM guest into OUT: OUT/vmlinuz (Debian's cloud kernel, from
# the .deb install-deps.sh downloaded) and OUT/initrd.gz (busybox and an
# /init that prints "tick N" to the serial console every 100 ms and, when
# a virtio disk is attached, keeps an ext2 filesystem on it with /hello
# (one line per boot) and /log (every tenth tick); with dirty=N on its
# command line it keeps rewriting N MiB of memory), and Debian's QEMU
# guest agent (qemu-ga, from the .deb install-deps.sh downloaded, with the
# host's copies of its libraries) on its virtio port; on ferry's cluster
# network it configures the address its command line gives. No download.
#
#   scripts/make-test-guest.sh OUT
set -Eeuo pipefail
out=${1:?usage: make-test-guest.sh OUT}
deb=$(ls /var/cache/ferry-build/guest/linux-image-*.deb 2>/dev/null | sort -V | tail -n1)
[[ -n $deb ]] || { echo "no guest kernel .deb in /var/cache/ferry-build/guest: run scripts/install-deps.sh" >&2; exit 1; }
qga_deb=$(ls /var/cache/ferry-build/guest/qemu-guest-agent_*.deb 2>/dev/null | sort -V | tail -n1)
[[ -n $qga_deb ]] || { echo "no qemu-guest-agent .deb in /var/cache/ferry-build/guest: run scripts/install-deps.sh" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/kernel"
cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz"
root="$work/initrd"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,run,lib/modules}
cp /bin/busybox "$root/bin/"
dpkg-deb -x "$qga_deb" "$work/qga"
cp "$work/qga/usr/sbin/qemu-ga" "$root/bin/"
for lib in $(ldd "$work/qga/usr/sbin/qemu-ga" | grep -o '/[^ ]*'); do
	cp -L --parents "$lib" "$root/"
done
# virtio_blk, virtio_net and what they need are modules in this kernel
# (no modules.dep).
modules=(drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
	drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk
	drivers/char/virtio_console net/core/failover drivers/net/net_failover drivers/net/virtio_net)
for m in "${modules[@]}"; do
	ko=$(find "$work"/kernel/lib/modules -path "*/kernel/$m.ko*" | head -n1)
	case $ko in
	*.xz) xz -dc "$ko" >"$root/lib/modules/$(basename "$m").ko" ;;
	*.zst) zstd -dqc "$ko" >"$root/lib/modules/$(basename "$m").ko" ;;
	*) cp "$ko" "$root/lib/modules/" ;;
	esac
done
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console \
	failover net_failover virtio_net; do
	insmod /lib/modules/$m.ko 2>/dev/null
done
# On ferry's cluster network: the address and gateway are on the command
# line (ferry.ip=, ferry.gateway=); with ferry.echo, a TCP echo server on
# port 7000 (the network tests' server).
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
ip=$(arg ferry.ip); gateway=$(arg ferry.gateway)
if [ -n "$ip" ]; then
	for i in $(seq 1 20); do [ -d /sys/class/net/eth0 ] && break; sleep 0.05; done
	ip link set lo up; ip link set eth0 up
	ip addr add "$ip/32" dev eth0
	ip route add "$gateway" dev eth0; ip route add default via "$gateway"
	echo "NETWORK $ip"
	grep -q ferry.echo /proc/cmdline && nc -ll -p 7000 -e /bin/cat &
fi
disk=
for i in $(seq 1 20); do [ -b /dev/vda ] && break; sleep 0.05; done
if [ -b /dev/vda ]; then
	mount -t ext2 /dev/vda /mnt 2>/dev/null || { mke2fs -q /dev/vda && mount -t ext2 /dev/vda /mnt; }
	echo "boot at $(cut -d' ' -f1 /proc/uptime)" >>/mnt/hello; sync
	disk=1
fi
# The guest agent, on the port QEMU names org.qemu.guest_agent.0.
port=
for i in $(seq 1 20); do
	port=$(grep -l org.qemu.guest_agent.0 /sys/class/virtio-ports/*/name 2>/dev/null | head -n1)
	[ -n "$port" ] && break; sleep 0.05
done
if [ -n "$port" ]; then
	qemu-ga -m virtio-serial -p /dev/$(basename $(dirname $port)) -t /tmp -f /run/qemu-ga.pid -d
fi
echo "BOOTED"
# dirty=N on the kernel command line: keep rewriting N MiB of its memory
# (a tmpfs file of random bytes), for migration benchmarks.
dirty=$(sed -n 's/.*dirty=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$dirty" ]; then
	mkdir -p /dirty && mount -t tmpfs -o size=$((dirty + 8))m tmpfs /dirty
	head -c $((dirty * 1048576)) /dev/urandom >/dirty/seed
	(while true; do cp /dirty/seed /dirty/copy; rm -f /dirty/copy; done) &
	echo "DIRTYING $dirty"
fi
n=0
while true; do
	n=$((n + 1))
	echo "tick $n"
	if [ -n "$disk" ] && [ $((n % 10)) -eq 0 ]; then echo "tick $n" >>/mnt/log; sync; fi
	sleep 0.1
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$out/initrd.gz")
echo "$out/vmlinuz $out/initrd.gz"
