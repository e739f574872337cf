#!/bin/bash
# Two libvirt "hosts" on this one machine, for migration tests.
#
#   ci/hosts.sh up     [--base DIR] [--hook PATH]
#   ci/hosts.sh down   [--base DIR]
#   ci/hosts.sh status [--base DIR]
#   ci/hosts.sh exec   [--base DIR] HOST [CMD...]     (HOST: vmc-a, vmc-b, a or b)
#
# Each host (vmc-a = 10.77.0.1/24, vmc-b = 10.77.0.2/24) is
#   * a network namespace (`ip netns`, /run/netns/HOST) with `lo` up and one
#     end of a veth pair (vmc-a0 <-> vmc-b0) between the two hosts;
#   * a mount and a UTS namespace pinned to $BASE/ns/HOST.mnt and
#     $BASE/ns/HOST.uts (hostname HOST), in which these paths are bind mounts
#     of per-host directories (seen from outside under $BASE/HOST/):
#         /run                 -> $BASE/HOST/run
#         /etc/libvirt         -> $BASE/HOST/etc-libvirt   (stock config copied in)
#         /var/lib/libvirt     -> $BASE/HOST/lib-libvirt
#         /var/log/libvirt     -> $BASE/HOST/log-libvirt
#         /var/cache/libvirt   -> $BASE/HOST/cache-libvirt
#         /etc/vmcrypt         -> $BASE/HOST/etc-vmcrypt
#         /etc/pki             -> $BASE/HOST/etc-pki       (libvirt's TLS certificates)
#         /var/lib/vmcrypt     -> $BASE/HOST/lib-vmcrypt
#         /var/log/vmcrypt     -> $BASE/HOST/log-vmcrypt
#         /etc/hosts           -> $BASE/HOST/hosts         (vmc-a and vmc-b resolvable)
#     Everything else is the machine's own file system, so $BASE/shared (and
#     the repository, the guest kernel, ...) have the same path on both hosts.
#     /run/vmcrypt-test exists on each host for test sockets.
#   * its own virtlogd and libvirtd (--listen: TLS on 16514 as libvirtd.conf
#     ships it, with a certificate of a test CA made by `up`; distinct
#     host_uuid), started by hand: qemu:///system inside the host,
#     qemu+tls://HOST/system from the other host.
#
# Run a command on a host:
#   nsenter --net=/run/netns/HOST --mount=$BASE/ns/HOST.mnt --uts=$BASE/ns/HOST.uts -- CMD
# (or `ci/hosts.sh exec HOST CMD`). The command starts in "/" of the host.
#
# --hook PATH installs /etc/libvirt/hooks/qemu on both hosts, a script that
# execs PATH with the hook's arguments (and stdin); when PATH is a folder
# (the machine's /etc/libvirt/hooks with the installed package's
# qemu.d/vmcrypt), its contents become each host's hooks folder. libvirtd
# reads hooks only when it starts, so this is the only way to add one.
#
# `up` first cleans up whatever a previous run left (it runs `down`). `down`
# kills every process in the hosts' namespaces (daemons, QEMU, vmcrypt-blk,
# ...), releases the namespaces and removes the veth pair; it is idempotent.
# Logs stay under $BASE until the next `up` ($BASE/logs, and each host's
# /var/log/libvirt under $BASE/HOST/log-libvirt). The QEMU capability cache
# is kept in $BASE/capcache between runs (libvirt checks it and probes
# QEMU again if it is stale).
#
# Default BASE: $VMC_HOSTS_BASE or /tmp/vmc-hosts (short: unix socket paths
# under it must fit in 108 bytes). Needs root, iproute2, util-linux, libvirt.
set -euo pipefail

HOSTS=(vmc-a vmc-b)
declare -A ADDR=([vmc-a]=10.77.0.1 [vmc-b]=10.77.0.2)
declare -A VETH=([vmc-a]=vmc-a0 [vmc-b]=vmc-b0)
# host path -> name of the per-host directory bound over it
BINDS=(
    /run:run
    /etc/libvirt:etc-libvirt
    /var/lib/libvirt:lib-libvirt
    /var/log/libvirt:log-libvirt
    /var/cache/libvirt:cache-libvirt
    /etc/vmcrypt:etc-vmcrypt
    /etc/pki:etc-pki
    /var/lib/vmcrypt:lib-vmcrypt
    /var/log/vmcrypt:log-vmcrypt
)
# Remembers the BASE of the last `up`, so `down` finds a crashed run's
# namespace files even when called with another --base.
STATE=/run/vmc-hosts.base
# Serialises up/down/status of this script (tests hold their own lock).
SCRIPT_LOCK=/run/lock/vmc-hosts.sh.lock

BASE=${VMC_HOSTS_BASE:-/tmp/vmc-hosts}
HOOK=
T0=$(date +%s.%N)

log() { echo "hosts: $*" >&2; }
die() {
    echo "hosts: error: $*" >&2
    exit 1
}
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

host_name() {
    case "$1" in
    a | vmc-a) echo vmc-a ;;
    b | vmc-b) echo vmc-b ;;
    *) die "unknown host $1 (vmc-a, vmc-b, a or b)" ;;
    esac
}

nsprefix() {
    local h=$1
    echo "nsenter --net=/run/netns/$h --mount=$BASE/ns/$h.mnt --uts=$BASE/ns/$h.uts --"
}

in_host() {
    local h=$1
    shift
    nsenter --net="/run/netns/$h" --mount="$BASE/ns/$h.mnt" --uts="$BASE/ns/$h.uts" -- "$@"
}

# ---------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------

# Inode numbers of the namespaces of our hosts that still exist (net from
# /run/netns, mnt/uts from pinned nsfs mounts of any base).
ns_inodes() {
    local h f
    for h in "${HOSTS[@]}"; do
        [ -e "/run/netns/$h" ] && stat -L -c %i "/run/netns/$h" 2>/dev/null || true
    done
    for f in $(pinned_files); do
        stat -L -c %i "$f" 2>/dev/null || true
    done
}

# Mount points of nsfs mounts named vmc-a.mnt, vmc-b.uts, ... (any base).
pinned_files() {
    awk '{
        for (i = 1; i <= NF; i++) if ($i == "-") break
        if ($(i + 1) == "nsfs" && $5 ~ /\/vmc-[ab]\.(mnt|uts)$/) print $5
    }' /proc/self/mountinfo
}

# PIDs of processes in any of the given namespace inodes.
pids_in() {
    local inodes=" $* " p n ino
    for p in /proc/[0-9]*; do
        for n in net mnt uts; do
            ino=$(readlink "$p/ns/$n" 2>/dev/null) || continue
            ino=${ino#*[}
            ino=${ino%]}
            if [[ $inodes == *" $ino "* ]]; then
                echo "${p#/proc/}"
                break
            fi
        done
    done
}

do_down() {
    local bases=("$BASE") b inodes pids f h i
    if [ -r "$STATE" ]; then
        b=$(cat "$STATE")
        [ -n "$b" ] && [ "$b" != "$BASE" ] && bases+=("$b")
    fi
    inodes=$(ns_inodes | sort -u | tr '\n' ' ')
    if [ -n "${inodes// /}" ]; then
        pids=$(pids_in $inodes | grep -vx "$$" || true)
        if [ -n "$pids" ]; then
            log "killing $(echo "$pids" | wc -w) process(es) in the hosts: $(for p in $pids; do tr -d '\n' <"/proc/$p/comm" 2>/dev/null && echo -n " "; done)"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                pids=$(for p in $pids; do [ -d "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && echo "$p"; done || true)
                [ -z "$pids" ] && break
                sleep 0.05
            done
            [ -z "$pids" ] || log "warning: still alive after SIGKILL: $pids"
        fi
    fi
    for f in $(pinned_files); do
        umount "$f" 2>/dev/null || umount -l "$f" 2>/dev/null || log "warning: cannot umount $f"
    done
    for b in "${bases[@]}"; do
        if mountpoint -q "$b/ns" 2>/dev/null; then
            umount "$b/ns" 2>/dev/null || umount -l "$b/ns" || log "warning: cannot umount $b/ns"
        fi
    done
    for h in "${HOSTS[@]}"; do
        if [ -e "/run/netns/$h" ]; then
            ip netns delete "$h" 2>/dev/null || log "warning: ip netns delete $h failed"
        fi
        # A veth end left in the root namespace by an interrupted `up`.
        if ip link show "${VETH[$h]}" >/dev/null 2>&1; then
            ip link delete "${VETH[$h]}" 2>/dev/null || true
        fi
    done
    rm -f "$STATE"
}

# ---------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------

# The per-host directories and configuration, before any namespace exists.
prepare_host() {
    local h=$1 d=$BASE/$1 bind dir uuid
    rm -rf "$d"
    for bind in "${BINDS[@]}"; do
        mkdir -p "$d/${bind#*:}"
    done
    # /run
    mkdir -p "$d/run/lock" "$d/run/libvirt" "$d/run/vmcrypt-test"
    ln -s /dev/shm "$d/run/shm"
    # /etc/libvirt: the stock configuration, without domains, networks'
    # autostart links or hooks.
    cp -a /etc/libvirt/. "$d/etc-libvirt/"
    rm -rf "$d/etc-libvirt/hooks" "$d/etc-libvirt/qemu/autostart"
    find "$d/etc-libvirt/qemu" -maxdepth 1 -name '*.xml' -delete 2>/dev/null || true
    rm -f "$d"/etc-libvirt/qemu/networks/autostart/* 2>/dev/null || true
    mkdir -p "$d/etc-libvirt/hooks"
    uuid=$(cat /proc/sys/kernel/random/uuid)
    cat >>"$d/etc-libvirt/libvirtd.conf" <<EOF

# ---- added by ci/hosts.sh for test host $h ----
host_uuid = "$uuid"
log_outputs = "${VMC_HOSTS_LOG_LEVEL:-3}:file:/var/log/libvirt/libvirtd.log"
EOF
    # qemu.conf stays exactly as Debian ships it: QEMU runs as libvirt-qemu
    # (uid 64055), dynamic_ownership and remember_owner on, libvirt's own
    # cgroups and mount namespace for each QEMU. Nothing there needs
    # overriding on this machine. The security driver is libvirt's default
    # too: it finds no AppArmor in this kernel (no securityfs, no
    # /sys/module/apparmor) and runs with "none" + DAC on its own (`virsh
    # capabilities`: secmodel none, dac +64055:+64055). On a host with
    # AppArmor, libvirt confines QEMU as well (README "Real hosts").
    if [ -d "$HOOK" ]; then
        # A hooks folder as a package installed it (qemu.d/vmcrypt).
        cp -a "$HOOK/." "$d/etc-libvirt/hooks/"
    elif [ -n "$HOOK" ]; then
        cat >"$d/etc-libvirt/hooks/qemu" <<EOF
#!/bin/sh
# Installed by ci/hosts.sh up --hook
exec '$HOOK' "\$@"
EOF
        chmod 755 "$d/etc-libvirt/hooks/qemu"
    fi
    # /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt
    mkdir -p "$d/lib-libvirt/qemu" "$d/lib-libvirt/images" "$d/lib-libvirt/boot" \
        "$d/log-libvirt/qemu" "$d/cache-libvirt/qemu/capabilities"
    if compgen -G "$BASE/capcache/*.xml" >/dev/null; then
        cp -p "$BASE"/capcache/*.xml "$d/cache-libvirt/qemu/capabilities/"
    fi
    # /etc/hosts
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        for x in "${HOSTS[@]}"; do
            echo "${ADDR[$x]} $x"
        done
    } >"$d/hosts"
}

# libvirt's TLS as a real host has it (libvirtd.conf unchanged: listen_tls,
# x509 client certificates): a test CA for both hosts, and for each host a
# server certificate (its name and address) and a client certificate, where
# libvirt looks for them (/etc/pki, per host).
make_pki() {
    local ca=$BASE/pki h d
    mkdir -p "$ca"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=vmcrypt test CA" -keyout "$ca/ca.key" -out "$ca/ca.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null || die "openssl: cannot make the test CA"
    for h in "${HOSTS[@]}"; do
        d=$BASE/$h/etc-pki
        mkdir -p "$d/CA" "$d/libvirt/private"
        chmod 700 "$d/libvirt/private"
        cp "$ca/ca.pem" "$d/CA/cacert.pem"
        issue "$h" server "serverAuth" "subjectAltName=DNS:$h,IP:${ADDR[$h]}" \
            "$d/libvirt/servercert.pem" "$d/libvirt/private/serverkey.pem"
        issue "$h" client "clientAuth" "subjectAltName=DNS:$h" \
            "$d/libvirt/clientcert.pem" "$d/libvirt/private/clientkey.pem"
    done
}

# issue HOST KIND EKU EXT CERT KEY: a P-256 certificate from the test CA.
issue() {
    local h=$1 kind=$2 eku=$3 ext=$4 cert=$5 key=$6 ca=$BASE/pki
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=vmcrypt test/CN=$h" \
        -keyout "$key" -out "$cert.csr" 2>/dev/null || die "openssl: $kind key for $h"
    chmod 600 "$key"
    openssl x509 -req -in "$cert.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" -CAcreateserial \
        -days 2 -out "$cert" -extfile <(printf '%s\n' "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=$eku" "$ext") \
        2>/dev/null || die "openssl: $kind certificate for $h"
    rm -f "$cert.csr"
}

setup_network() {
    local h
    for h in "${HOSTS[@]}"; do
        ip netns add "$h"
    done
    ip link add "${VETH[vmc-a]}" netns vmc-a type veth peer name "${VETH[vmc-b]}" netns vmc-b
    for h in "${HOSTS[@]}"; do
        ip -n "$h" link set lo up
        ip -n "$h" addr add "${ADDR[$h]}/24" dev "${VETH[$h]}"
        ip -n "$h" link set "${VETH[$h]}" up
    done
}

# The mount + UTS namespace of host $1, pinned to files under $BASE/ns.
setup_mounts() {
    local h=$1 d=$BASE/$1 script bind
    touch "$BASE/ns/$h.mnt" "$BASE/ns/$h.uts"
    script="set -e
hostname $h
# Copies of the other pins and of /run/netns, which this namespace does not
# need (and which would keep those namespaces alive).
umount -l '$BASE/ns' 2>/dev/null || true
umount -R -l /run/netns 2>/dev/null || true
"
    for bind in "${BINDS[@]}"; do
        script+="mkdir -p '${bind%%:*}'
mount --bind '$d/${bind#*:}' '${bind%%:*}'
"
    done
    script+="mount --bind '$d/hosts' /etc/hosts
"
    unshare --mount="$BASE/ns/$h.mnt" --uts="$BASE/ns/$h.uts" --propagation private \
        -- /bin/sh -c "$script"
}

start_daemons() {
    local h=$1
    # virtlogd and libvirtd daemonize themselves (-d). libvirtd starts on
    # CPU 0 only (taskset -c 0), as the QEMU capability cache was probed,
    # so that the cache copied from the other host (or a previous run) is
    # found valid; wait_libvirtd widens its affinity once it answers.
    # (8>&-: the daemons must not inherit this script's lock.)
    # First the system D-Bus, which every real host has and which libvirtd
    # needs for polkit (Debian's libvirtd.conf: auth_unix_rw = "polkit", so
    # a user in group libvirt is let in by polkit's 60-libvirt.rules, and
    # pkexec asks polkit for vmcrypt's admin role); PID 1 here is not
    # systemd, so nothing else starts it. polkitd is started by D-Bus
    # activation on first use, as on a host without systemd. libvirtd looks
    # for the bus once, at start: it must be up before.
    if command -v dbus-daemon >/dev/null; then
        in_host "$h" sh -c 'mkdir -p /run/dbus && exec dbus-daemon --system --fork' \
            >>"$BASE/logs/$h-dbus.out" 2>&1 </dev/null 8>&- ||
            die "dbus-daemon --system did not start on $h (see $BASE/logs/$h-dbus.out)"
    fi
    in_host "$h" virtlogd -d >>"$BASE/logs/$h-virtlogd.out" 2>&1 </dev/null 8>&- ||
        die "virtlogd did not start on $h (see $BASE/logs/$h-virtlogd.out)"
    in_host "$h" taskset -c 0 libvirtd -d --listen >>"$BASE/logs/$h-libvirtd.out" 2>&1 </dev/null 8>&- ||
        die "libvirtd did not start on $h (see $BASE/logs/$h-libvirtd.out)"
}

wait_libvirtd() {
    local h=$1 i
    for ((i = 0; i < 1200; i++)); do
        if in_host "$h" virsh -q -c qemu:///system version >/dev/null 2>&1; then
            log "libvirtd on $h answers ($(elapsed) s)"
            # Its capabilities are loaded: let it (and what it spawns that
            # does not reset its affinity, like hooks) use every CPU again.
            taskset -a -p -c "$(cat /sys/devices/system/cpu/online)" \
                "$(cat "$BASE/$h/run/libvirtd.pid")" >/dev/null 2>&1 ||
                log "warning: cannot widen the CPU affinity of libvirtd on $h"
            return 0
        fi
        if [ $((i % 10)) -eq 9 ] && ! pid_alive "$BASE/$h/run/libvirtd.pid"; then
            die "libvirtd on $h died; see $BASE/logs/$h-libvirtd.out and $BASE/$h/log-libvirt/libvirtd.log:
$(tail -n 20 "$BASE/$h/log-libvirt/libvirtd.log" 2>/dev/null)"
        fi
        sleep 0.1
    done
    die "libvirtd on $h did not answer within 120 s; see $BASE/$h/log-libvirt/libvirtd.log"
}

pid_alive() {
    local p
    p=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

save_capcache() {
    local from=$BASE/$1/cache-libvirt/qemu/capabilities
    compgen -G "$from/*.xml" >/dev/null || return 0
    mkdir -p "$BASE/capcache"
    rm -f "$BASE"/capcache/*.xml
    cp -p "$from"/*.xml "$BASE/capcache/"
}

do_up() {
    local h first_cache
    case "$BASE" in
    /run | /run/* | /var/run/* | /etc/libvirt* | /var/lib/libvirt* | /var/log/libvirt* | /var/cache/libvirt*)
        die "--base $BASE is hidden inside the hosts; use e.g. /tmp/vmc-hosts" ;;
    esac
    for c in ip nsenter unshare taskset libvirtd virtlogd virsh; do
        command -v "$c" >/dev/null || die "$c not found (ci/install-deps.sh)"
    done
    if [ -n "$HOOK" ]; then
        [ -x "$HOOK" ] || die "hook $HOOK is not an executable file or a hooks folder"
        HOOK=$(readlink -f "$HOOK")
    fi
    do_down
    mkdir -p "$BASE"
    BASE=$(readlink -f "$BASE")
    echo "$BASE" >"$STATE"
    rm -rf "$BASE/logs" "$BASE/shared" "$BASE/ns" "$BASE/pki"
    mkdir -p "$BASE/logs" "$BASE/shared" "$BASE/ns"
    chmod 755 "$BASE" "$BASE/shared"
    for h in "${HOSTS[@]}"; do
        prepare_host "$h"
    done
    make_pki
    setup_network
    # The pin files must sit on a private mount.
    mount --bind "$BASE/ns" "$BASE/ns"
    mount --make-private "$BASE/ns"
    for h in "${HOSTS[@]}"; do
        setup_mounts "$h"
    done
    log "namespaces ready after $(elapsed) s"
    if compgen -G "$BASE/capcache/*.xml" >/dev/null; then
        first_cache=no
        for h in "${HOSTS[@]}"; do
            start_daemons "$h"
        done
        for h in "${HOSTS[@]}"; do
            wait_libvirtd "$h"
        done
    else
        # No cache yet: probe QEMU once, on vmc-a, and give vmc-b the result.
        first_cache=yes
        start_daemons vmc-a
        wait_libvirtd vmc-a
        save_capcache vmc-a
        mkdir -p "$BASE/vmc-b/cache-libvirt/qemu/capabilities"
        if compgen -G "$BASE/capcache/*.xml" >/dev/null; then
            cp -p "$BASE"/capcache/*.xml "$BASE/vmc-b/cache-libvirt/qemu/capabilities/"
        fi
        start_daemons vmc-b
        wait_libvirtd vmc-b
    fi
    # Keep the cache fresh for the next run (libvirt may have re-probed).
    [ "$first_cache" = yes ] || save_capcache vmc-a
    log "up in $(elapsed) s"
    print_facts
}

print_facts() {
    local h
    for h in "${HOSTS[@]}"; do
        cat <<EOF
$h: ${ADDR[$h]}  qemu+tls://$h/system  (inside: qemu:///system)
  run:  $(nsprefix "$h") CMD
  dirs: $BASE/$h/{run,etc-libvirt,lib-libvirt,log-libvirt,cache-libvirt,etc-vmcrypt,lib-vmcrypt,log-vmcrypt}
EOF
    done
    cat <<EOF
shared: $BASE/shared (same path on both hosts)
logs:   $BASE/logs, $BASE/HOST/log-libvirt (libvirtd.log, qemu/DOM.log)
EOF
}

do_status() {
    local h ok=0 pid
    for h in "${HOSTS[@]}"; do
        if [ ! -e "/run/netns/$h" ] || ! mountpoint -q "$BASE/ns/$h.mnt" 2>/dev/null; then
            echo "$h: down"
            ok=1
            continue
        fi
        pid=$(cat "$BASE/$h/run/libvirtd.pid" 2>/dev/null || true)
        if in_host "$h" virsh -q -c qemu:///system version >/dev/null 2>&1; then
            echo "$h: up (${ADDR[$h]}, libvirtd pid $pid)"
            in_host "$h" virsh -q -c qemu:///system list --all | sed 's/^/  /'
        else
            echo "$h: namespaces exist, libvirtd not answering (pid file: ${pid:-none})"
            ok=1
        fi
    done
    return $ok
}

# ---------------------------------------------------------------------------

[ $# -ge 1 ] || usage
cmd=$1
shift
case "$cmd" in
up | down | status)
    while [ $# -gt 0 ]; do
        case "$1" in
        --base)
            [ $# -ge 2 ] || usage
            BASE=$2
            shift 2
            ;;
        --hook)
            [ "$cmd" = up ] && [ $# -ge 2 ] || usage
            HOOK=$2
            shift 2
            ;;
        *) usage ;;
        esac
    done
    ;;
exec)
    if [ "${1:-}" = --base ]; then
        [ $# -ge 2 ] || usage
        BASE=$2
        shift 2
    fi
    [ $# -ge 1 ] || usage
    h=$(host_name "$1")
    shift
    [ -e "/run/netns/$h" ] && [ -e "$BASE/ns/$h.mnt" ] || die "$h is not up (base $BASE)"
    [ $# -gt 0 ] || set -- /bin/bash
    exec nsenter --net="/run/netns/$h" --mount="$BASE/ns/$h.mnt" --uts="$BASE/ns/$h.uts" -- "$@"
    ;;
-h | --help | help) usage ;;
*) usage ;;
esac

[ "$(id -u)" = 0 ] || die "needs root"
mkdir -p "$(dirname "$SCRIPT_LOCK")"
exec 8>"$SCRIPT_LOCK"
if ! flock -w 120 8; then
    die "$SCRIPT_LOCK is held for 120 s by: $(fuser "$SCRIPT_LOCK" 2>&1 || true)"
fi
T0=$(date +%s.%N)
case "$cmd" in
up) do_up ;;
down)
    do_down
    log "down in $(elapsed) s"
    ;;
status) do_status ;;
esac
