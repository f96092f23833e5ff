#!/bin/busybox sh
# /init of the virtbus test guest (busybox, PID 1). Protocol: tests/guests/README.md.
# Markers go to the serial console (ttyS0); commands come from the kernel command line
# (virtbus.cmd=), the second serial port (ttyS1) and the virtio-serial port
# "org.virtbus.guest.0". PID 1 must never exit: the kernel would panic.

/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

CON=/dev/console
say() { echo "$*" >$CON; }

while read -r mod; do
    [ -n "$mod" ] && insmod "/lib/modules/$mod.ko" 2>/dev/null
done </lib/modules/load.order

TICK=0.5
CMDS=""
DHCP=""
PEER=""
ECHO=""
SINK=""
ADDR=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        virtbus.tick=*) TICK="${arg#virtbus.tick=}" ;;
        virtbus.cmd=*) CMDS="${arg#virtbus.cmd=}" ;;
        virtbus.dhcp=*) DHCP="${arg#virtbus.dhcp=}" ;;
        virtbus.ping=*) PEER="${arg#virtbus.ping=}" ;;
        virtbus.echo=*) ECHO="${arg#virtbus.echo=}" ;;
        virtbus.sink=*) SINK="${arg#virtbus.sink=}" ;;
        virtbus.ip=*) ADDR="${arg#virtbus.ip=}" ;;
    esac
done

# Wait (bounded) for the block device; virtio probing is asynchronous.
DISK=""
i=0
while [ $i -lt 20 ]; do
    for d in /dev/vda /dev/sda; do [ -b "$d" ] && DISK="$d"; done
    [ -n "$DISK" ] && break
    if [ -d /sys/bus/virtio/devices ] && ! grep -qs 0x0002 /sys/bus/virtio/devices/*/device; then
        break
    fi
    sleep 0.1
    i=$((i + 1))
done

# blocks: the guest's block devices (/sys/block, without loop and ram), on one line.
blocks() {
    local out="" b
    for b in /sys/block/*; do
        b="${b##*/}"
        case "$b" in loop*|ram*|"*") ;; *) out="$out $b" ;; esac
    done
    echo "${out# }"
}

# nics: the guest's network interfaces (/sys/class/net, without lo), on one line.
nics() {
    local out="" n
    for n in /sys/class/net/*; do
        n="${n##*/}"
        case "$n" in lo|"*") ;; *) out="$out $n" ;; esac
    done
    echo "${out# }"
}

# dhcp <nic>: udhcpc on it forever (renewing); every lease bound goes to the console.
dhcp() {
    cat >/tmp/udhcpc.sh <<'EOS'
#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "VIRTBUS-LEASE $interface $ip" >/dev/console ;;
esac
exit 0
EOS
    chmod 755 /tmp/udhcpc.sh
    ip link set "$1" up
    udhcpc -i "$1" -f -S -t 0 -T 1 -A 1 -s /tmp/udhcpc.sh >/dev/null 2>&1 &
}

# pinger <address>: one ping a second, forever; each answer or silence on the console.
pinger() {
    local n=0
    while :; do
        if ping -c 1 -W 1 "$1" >/dev/null 2>&1; then say "VIRTBUS-PING-OK $1 $n"
        else say "VIRTBUS-PING-FAIL $1 $n"; sleep 1; fi
        n=$((n + 1))
        sleep 1
    done
}

# run_cmd <reply: "3" or ""> <command words...>: runs one protocol command; replies go to
# the console and, when called from serve, back on fd 3.
run_cmd() {
    local out="$1" cmd="${2:-}" count j mib sum
    shift; [ $# -gt 0 ] && shift
    reply() { say "$*"; [ -n "$out" ] && echo "$*" >&3 2>/dev/null; }
    case "$cmd" in
        "") return ;;
        ping) reply "VIRTBUS-PONG $*" ;;
        panic)
            reply "VIRTBUS-ACK panic"
            echo 1 >/proc/sys/kernel/sysrq
            echo c >/proc/sysrq-trigger ;;
        poweroff)
            reply "VIRTBUS-ACK poweroff"
            sync; poweroff -f ;;
        reboot)
            reply "VIRTBUS-ACK reboot"
            sync; reboot -f ;;
        burn)
            count="${1:-1}"; j=0
            while [ $j -lt "$count" ]; do
                ( while :; do :; done ) &
                echo $! >>/tmp/burn.pids; j=$((j + 1))
            done
            reply "VIRTBUS-DONE burn $count" ;;
        burn-stop)
            [ -f /tmp/burn.pids ] && kill $(cat /tmp/burn.pids) 2>/dev/null
            rm -f /tmp/burn.pids
            reply "VIRTBUS-DONE burn-stop" ;;
        send)  # send <ip> <port> <mib>: zeros over TCP to a sink, which answers its byte count
            got=$(dd if=/dev/zero bs=64k count=$((${3:-16} * 16)) 2>/dev/null | nc "$1" "$2")
            reply "VIRTBUS-SENT ${got:-0}" ;;
        read)
            mib="${1:-8}"
            if [ -z "$DISK" ]; then reply "VIRTBUS-ERROR read no-disk"; return; fi
            dd if="$DISK" of=/dev/null bs=1M count="$mib" iflag=direct 2>/dev/null
            reply "VIRTBUS-DONE read $mib" ;;
        write)
            mib="${1:-1}"
            if [ -z "$DISK" ]; then reply "VIRTBUS-ERROR write no-disk"; return; fi
            # The scratch area starts at 8 MiB; the known pattern below it stays intact.
            dd if=/dev/zero of="$DISK" bs=1M count="$mib" seek=8 oflag=direct conv=fsync \
                2>/dev/null
            reply "VIRTBUS-DONE write $mib" ;;
        disk-md5)
            mib="${1:-1}"
            if [ -z "$DISK" ]; then reply "VIRTBUS-ERROR disk-md5 no-disk"; return; fi
            sum=$(dd if="$DISK" bs=1M count="$mib" iflag=direct 2>/dev/null | md5sum)
            reply "VIRTBUS-DISK-MD5 $mib ${sum%% *}" ;;
        blocks) reply "VIRTBUS-BLOCKS $(blocks)" ;;
        # probes of what the host gave the guest (firmware, TPM, shares); one line each
        ls)
            if [ -e "${1:-/}" ]; then reply "VIRTBUS-LS ${1:-/} $(ls "${1:-/}" | tr '\n' ' ')"
            else reply "VIRTBUS-LS ${1:-/} missing"; fi ;;
        cat)
            if [ -r "${1:-}" ]; then reply "VIRTBUS-CAT $1 $(head -c 4096 "$1" | head -n 1)"
            else reply "VIRTBUS-CAT ${1:-} missing"; fi ;;
        mount)  # mount <type> <source> <dir>
            mkdir -p "${3:-/mnt}"
            if mount -t "${1:-}" "${2:-}" "${3:-/mnt}" 2>/dev/null; then
                reply "VIRTBUS-MOUNT ${3:-/mnt} ok"
            else reply "VIRTBUS-MOUNT ${3:-/mnt} failed"; fi ;;
        tpm-extend)  # tpm-extend <pcr>: TPM2_PCR_Extend(sha256, 32 x 0x01), raw on /dev/tpm0
            if [ ! -c /dev/tpm0 ]; then reply "VIRTBUS-ERROR tpm-extend no-tpm"; return; fi
            j=$(printf '%03o' "${1:-16}")
            {
                printf '\200\002\000\000\000\101\000\000\001\202\000\000\000\'"$j"
                printf '\000\000\000\011\100\000\000\011\000\000\000\000\000'
                printf '\000\000\000\001\000\013'
                k=0; while [ $k -lt 32 ]; do printf '\001'; k=$((k + 1)); done
            } >/tmp/extend.bin
            # the response belongs to the descriptor the command was written on
            sum=$({ cat /tmp/extend.bin >&4 && dd bs=4096 count=1 <&4 2>/dev/null; } \
                4<>/dev/tpm0 | od -An -tx1 | tr -d ' \n')
            reply "VIRTBUS-TPM-EXTEND ${1:-16} ${sum:-none}" ;;
        rtc-set)  # rtc-set <seconds>: the clock moves by that much and is written to the RTC
            date -s "@$(( $(date +%s) + ${1:-3600} ))" >/dev/null 2>&1
            if hwclock -w -u 2>/dev/null; then reply "VIRTBUS-DONE rtc-set ${1:-3600}"
            else reply "VIRTBUS-ERROR rtc-set failed"; fi ;;
        watchdog-arm) watchdog_arm ;;
        *) reply "VIRTBUS-ERROR unknown $cmd" ;;
    esac
}

# watchdog_arm: starts the i6300esb's timer (about 1 s over its two stages) and never feeds
# it. The kernel has no driver for it, so the registers are written as Linux's i6300esb.c
# does: preloads through BAR0 (each after the 0x80, 0x86 unlock), a reload, then the enable
# bit of the lock register in PCI config space.
watchdog_arm() {
    local d dev base cmdreg
    dev=""
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor")" = 0x8086 ] && [ "$(cat "$d/device")" = 0x25ab ] && dev="$d"
    done
    if [ -z "$dev" ]; then reply "VIRTBUS-ERROR watchdog-arm no-watchdog"; return; fi
    base=$(( $(head -n 1 "$dev/resource" | cut -d' ' -f1) ))
    cmdreg=$(dd if="$dev/config" bs=1 skip=4 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
    printf "\\$(printf '%03o' $(( ${cmdreg:-0} | 2 )))" |
        dd of="$dev/config" bs=1 seek=4 count=1 conv=notrunc 2>/dev/null  # memory decoding
    unlock() { devmem $((base + 12)) 16 0x80; devmem $((base + 12)) 16 0x86; }
    unlock; devmem "$base" 32 512           # stage 1: 1 s << 9, as the Linux driver
    unlock; devmem $((base + 4)) 32 512     # stage 2
    unlock; devmem $((base + 12)) 16 0x100  # reload
    printf '\002' | dd of="$dev/config" bs=1 seek=104 count=1 conv=notrunc 2>/dev/null
    reply "VIRTBUS-DONE watchdog-arm"
}

# serve <device>: reads newline-terminated commands from a device forever; replies go back
# on the same descriptor (a virtio-serial port may be open only once).
serve() {
    local dev="$1" line
    while :; do
        # A failed redirection on a compound command does not end the shell (on exec it would).
        [ -c "$dev" ] && {
            [ "${dev#/dev/tty}" != "$dev" ] && stty raw -echo <&3
            while IFS= read -r line <&3; do
                line=$(echo "$line" | tr -d '\r')
                # shellcheck disable=SC2086
                run_cmd 3 $line
            done
        } 3<>"$dev" 2>/dev/null
        sleep 0.2   # EOF (host side not connected) or device absent: retry.
    done
}

CTL=""
if stty -F /dev/ttyS1 >/dev/null 2>&1; then
    serve /dev/ttyS1 &
    CTL="$CTL ttyS1"
fi
for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] || continue
    if [ "$(cat "$p/name")" = "org.virtbus.guest.0" ]; then
        serve "/dev/${p##*/}" &
        CTL="$CTL ${p##*/}"
    fi
done

# ACPI power button: any input event from a "Power Button" device means power off.
watch_button() {  # runs in its own background subshell
    dd if="$1" of=/dev/null bs=24 count=1 2>/dev/null
    say "VIRTBUS-POWER-BUTTON"
    sync; poweroff -f
}
BUTTONS=""
cat /proc/bus/input/devices >/tmp/input-devices
for h in $(awk '/^N: Name=/ { name = $0 }
        /^H: Handlers=/ && name ~ /Power Button/ {
            for (i = 2; i <= NF; i++) { f = $i; sub(/^Handlers=/, "", f); if (f ~ /^event/) print f }
        }' /tmp/input-devices); do
    watch_button "/dev/input/$h" &
    BUTTONS="$BUTTONS $h"
done
# READY promises that a power-button press is seen: wait until every watcher holds its device.
i=0
for h in $BUTTONS; do
    while [ $i -lt 100 ] && ! ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q "/dev/input/$h"; do
        sleep 0.02
        i=$((i + 1))
    done
done

say "VIRTBUS-GUEST-READY"
say "VIRTBUS-INFO kernel=$(uname -r) disk=${DISK:-none} control=${CTL# } buttons=${BUTTONS# }"

# Networking on request (virtbus.dhcp=<nic>, virtbus.ping=<address>).
[ -n "$DHCP" ] && dhcp "$DHCP"
if [ -n "$ADDR" ]; then  # a static address on eth0 (virtbus.ip=<address>/<prefix>)
    ip link set eth0 up && ip addr add "$ADDR" dev eth0 && say "VIRTBUS-IP eth0 ${ADDR%/*}"
fi
[ -n "$PEER" ] && pinger "$PEER" &
# A TCP echo server on request (virtbus.echo=<port>), for streams that must outlive a
# migration; -ll: it keeps listening after the first connection ends.
# A TCP sink (virtbus.sink=<port>): counts what a connection brings and answers the count
# (throughput benchmarks send to it with the send command).
if [ -n "$SINK" ]; then
    nc -ll -p "$SINK" -e wc -c &
    say "VIRTBUS-SINK $SINK"
fi
if [ -n "$ECHO" ]; then
    nc -ll -p "$ECHO" -e cat &
    say "VIRTBUS-ECHO $ECHO"
fi

# Kernel command line commands: virtbus.cmd=<cmd>[+<arg>]@<tick>,...
# Every change of the block devices or NICs (hot-plugged or unplugged) is reported.
n=0
BLOCKS="$(blocks)"
say "VIRTBUS-BLOCKS $BLOCKS"
NICS="$(nics)"
say "VIRTBUS-NICS $NICS"
while :; do
    say "VIRTBUS-TICK $n"
    now="$(blocks)"
    if [ "$now" != "$BLOCKS" ]; then
        BLOCKS="$now"
        say "VIRTBUS-BLOCKS $BLOCKS"
    fi
    now="$(nics)"
    if [ "$now" != "$NICS" ]; then
        NICS="$now"
        say "VIRTBUS-NICS $NICS"
    fi
    if [ -n "$CMDS" ]; then
        for item in $(echo "$CMDS" | tr ',' ' '); do
            if [ "${item##*@}" = "$n" ]; then
                # shellcheck disable=SC2046
                run_cmd "" $(echo "${item%@*}" | tr '+' ' ')
            fi
        done
    fi
    n=$((n + 1))
    sleep "$TICK"
done
