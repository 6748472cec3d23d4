#!/bin/busybox sh
# GenOS initramfs init (PID 1). Mounts the essentials, reports "ready" on the console,
# tells the VMM's boot timer that boot finished, then switches to the root filesystem
# on the first virtio-blk disk, or stays here with a shell when there is none.
#
# Kernel command line options:
#   genos.root=DEV      root device (default /dev/vda)
#   genos.overlay       mount the root read-only under a tmpfs overlay (ephemeral writes)
#   genos.init=PATH     init to run in the root filesystem (default /sbin/init)
#   genos.exit=reboot|poweroff   end the VM right after the ready line (tests)
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /mnt/root
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
exec </dev/console >/dev/console 2>&1

root=/dev/vda
overlay=
init=/sbin/init
after=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        genos.root=*) root="${arg#genos.root=}" ;;
        genos.overlay) overlay=1 ;;
        genos.init=*) init="${arg#genos.init=}" ;;
        genos.exit=*) after="${arg#genos.exit=}" ;;
    esac
done

echo "genos-init: ready"
devmem 0xd0000000 8 123 || echo "genos-init: boot timer page not writable"

case "$after" in
    reboot) reboot -f ;;
    poweroff) poweroff -f ;;
esac

if [ -b "$root" ]; then
    if [ -n "$overlay" ]; then
        mkdir -p /mnt/lower /mnt/rw
        if mount -o ro "$root" /mnt/lower; then
            mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
            mkdir -p /mnt/rw/upper /mnt/rw/work
            mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /mnt/root
        fi
    else
        mount "$root" /mnt/root
    fi
    if [ -e "/mnt/root$init" ] || [ -L "/mnt/root$init" ]; then
        echo "genos-init: switching to $root"
        umount /sys
        umount /proc
        mount --move /dev /mnt/root/dev 2>/dev/null || umount /dev
        exec switch_root /mnt/root "$init"
    fi
    echo "genos-init: $root holds no $init; staying in the initramfs"
    umount /mnt/root 2>/dev/null
else
    echo "genos-init: no root disk at $root; staying in the initramfs"
fi

if [ -x /sbin/genos-agent ]; then
    # No init system here: --initramfs makes the agent report stage `system` at once and
    # power off through reboot(2). It serves vsock and the virtio-serial port (docs/agent.md).
    /sbin/genos-agent --initramfs &
fi
hostname genos
while true; do
    setsid cttyhack sh -l
done
