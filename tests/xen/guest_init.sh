#!/bin/busybox sh
# /init of the PVH test guest. Kernel command line: virtbus.act=crash|poweroff|reboot and
# virtbus.delay=SECONDS; with no action it idles (and `xl shutdown` works through
# /sbin/poweroff, which the kernel runs on control/shutdown).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
ACT=""; DELAY=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        virtbus.act=*) ACT="${arg#virtbus.act=}" ;;
        virtbus.delay=*) DELAY="${arg#virtbus.delay=}" ;;
    esac
done
echo "GUEST-UP act=$ACT"
if [ -n "$ACT" ]; then
    sleep "$DELAY"
    case "$ACT" in
        crash) echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger ;;
        poweroff) poweroff -f ;;
        reboot) reboot -f ;;
    esac
fi
while :; do sleep 3600; done
