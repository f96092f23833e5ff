#!/usr/bin/env bash
# Start libvirt 9.0 beside virtbus on a machine without systemd (see shared notes):
# packages, the libvirt-qemu user, a permissive qemu.conf, virtlogd and libvirtd. Idempotent.
set -euo pipefail
if ! command -v libvirtd >/dev/null && [ ! -x /usr/sbin/libvirtd ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt >/dev/null
fi
id libvirt-qemu >/dev/null 2>&1 || useradd -r libvirt-qemu
conf=/etc/libvirt/qemu.conf
mkdir -p /etc/libvirt && touch "$conf"
for kv in 'user = "root"' 'group = "root"' 'dynamic_ownership = 0' 'security_driver = "none"'; do
  key=${kv%% =*}
  grep -q "^$key =" "$conf" || echo "$kv" >> "$conf"
done
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt
pgrep -x virtlogd >/dev/null || /usr/sbin/virtlogd -d
pgrep -x libvirtd >/dev/null || /usr/sbin/libvirtd -d
for _ in $(seq 1 30); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "libvirtd does not answer" >&2
exit 1
