#!/bin/busybox sh
# /init of the nested-Xen dom0 (busybox, PID 1): bring up the Xen toolstack, run the
# scenario runner (tests/xen/scenarios.py), report over the console, power off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/xenstored /run/xen /var/lib/xenstored /var/log/xen/console /var/lib/xen/userdata
exec </dev/console >/dev/console 2>&1
echo "VIRTBUS-DOM0 init $(cut -d' ' -f1 /proc/uptime)"
while read -r mod; do
    [ -n "$mod" ] && insmod "/lib/modules/$mod.ko" || echo "VIRTBUS-DOM0 insmod $mod failed"
done </lib/modules/load.order
mount -t xenfs xenfs /proc/xen
ip link set lo up
hostname dom0
xenstored --pid-file /run/xenstored.pid || echo "VIRTBUS-DOM0 xenstored failed"
xen-init-dom0 || echo "VIRTBUS-DOM0 xen-init-dom0 failed"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "VIRTBUS-DOM0 toolstack up $(cut -d' ' -f1 /proc/uptime)"
ARGS=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in virtbus.args=*) ARGS="$(echo "${arg#virtbus.args=}" | tr + ' ')" ;; esac
done
cd /opt/virtbus
PYTHONPATH=/opt/virtbus PYTHONDONTWRITEBYTECODE=1 python3 -m tests.xen.scenarios $ARGS
echo "VIRTBUS-DOM0 runner exit $? $(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
