#!/bin/bash
# Build a tiny test guest from the host's Debian kernel and busybox-static.
#
#   ci/build-guest.sh OUTDIR
#
# Produces OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz. The initramfs' /init
# loads the virtio-blk and ext4 modules and then runs a command loop on
# /dev/ttyS0 (see "Serial protocol" below). Idempotent: does nothing when the
# outputs exist, are newer than the kernel and busybox, and were built by this
# very script for this kernel version (OUTDIR/stamp).
#
# Environment:
#   VMCRYPT_GUEST_KVER  kernel version to use (default: newest /boot/vmlinuz-*)
#   BUSYBOX             static busybox binary (default: /bin/busybox)
#
# Serial protocol (implemented by tests/src/guest.rs):
#   guest -> host  "VMCRYPT-GUEST-READY" once per boot, when the loop starts.
#   host  -> guest one line: "<id> <base64 of a shell script>\n"
#   guest -> host  "__VMCRYPT_BEGIN__ <id>", then the script's stdout+stderr
#                  (stdin is /dev/null), then "__VMCRYPT_DONE__ <id> <status>".
#                  The DONE marker is printed right after the output, so it
#                  may share a line with output that lacks a final newline.
#   The tty is in raw mode without echo: no line length limit, no \r\n
#   translation of script output (the kernel's own console lines still end
#   in \r\n).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUTDIR=$1
SCRIPT=$(readlink -f "$0")
BUSYBOX=${BUSYBOX:-/bin/busybox}

if [ -n "${VMCRYPT_GUEST_KVER:-}" ]; then
    KVER=$VMCRYPT_GUEST_KVER
else
    KERNEL=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$KERNEL" ]; then
        echo "build-guest: no /boot/vmlinuz-* found (apt-get install linux-image-amd64)" >&2
        exit 1
    fi
    KVER=${KERNEL#/boot/vmlinuz-}
fi
KERNEL=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
for f in "$KERNEL" "$MODDIR/modules.dep" "$BUSYBOX"; do
    if [ ! -r "$f" ]; then
        echo "build-guest: cannot read $f" >&2
        exit 1
    fi
done
if ! "$BUSYBOX" --help >/dev/null 2>&1 || ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "build-guest: $BUSYBOX is not a static busybox (apt-get install busybox-static)" >&2
    exit 1
fi

mkdir -p "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")
STAMP_WANT="kver=$KVER script=$(sha256sum "$SCRIPT" | cut -d' ' -f1)"

up_to_date() {
    local f
    [ -f "$OUTDIR/stamp" ] && [ "$(cat "$OUTDIR/stamp")" = "$STAMP_WANT" ] || return 1
    for f in "$OUTDIR/vmlinuz" "$OUTDIR/initramfs.cpio.gz"; do
        [ -s "$f" ] && [ "$f" -nt "$KERNEL" ] && [ "$f" -nt "$BUSYBOX" ] || return 1
    done
}

# Serialise concurrent builds (several test processes may start at once).
exec 9>"$OUTDIR/.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if up_to_date; then
    exit 0
fi

WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,mnt,etc,root,lib/modules}

cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"

# ---- kernel modules ------------------------------------------------------
# Wanted modules, in the order given; dependencies (from modules.dep) are
# loaded first. A module that is built in (modules.builtin) is skipped.
WANT="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
crc16 mbcache jbd2 crc32c_generic libcrc32c ext4"

norm() { echo "${1//-/_}"; }
# modules.dep path of a module name, or empty.
modpath() {
    local name
    name=$(norm "$1")
    awk -F: -v n="$name" '{
        p = $1; b = p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b); gsub(/-/, "_", b)
        if (b == n) { print p; exit }
    }' "$MODDIR/modules.dep"
}
is_builtin() {
    local name
    name=$(norm "$1")
    [ -f "$MODDIR/modules.builtin" ] || return 1
    sed -e 's/.*\///' -e 's/\.ko$//' -e 's/-/_/g' "$MODDIR/modules.builtin" | grep -qx "$name"
}

ORDER=()
declare -A SEEN=()
visit() {
    local path=$1 deps d i
    [ -n "${SEEN[$path]:-}" ] && return 0
    SEEN[$path]=1
    deps=$(awk -F: -v p="$path" '$1 == p { print $2; exit }' "$MODDIR/modules.dep")
    # modules.dep lists dependencies so that the last one is loaded first.
    read -r -a darr <<<"$deps" || true
    for ((i = ${#darr[@]} - 1; i >= 0; i--)); do
        visit "${darr[$i]}"
    done
    ORDER+=("$path")
}
for m in $WANT; do
    if is_builtin "$m"; then
        continue
    fi
    p=$(modpath "$m")
    if [ -z "$p" ]; then
        echo "build-guest: module $m is neither in modules.dep nor built in; skipped" >&2
        continue
    fi
    visit "$p"
done

LOADLIST=
for p in "${ORDER[@]}"; do
    base=${p##*/}
    dst="$ROOT/lib/modules/${base%%.ko*}.ko"
    case "$p" in
    *.ko) cp "$MODDIR/$p" "$dst" ;;
    *.ko.xz) xz -dc "$MODDIR/$p" >"$dst" ;;
    *.ko.zst) zstd -qdc "$MODDIR/$p" >"$dst" ;;
    *.ko.gz) gzip -dc "$MODDIR/$p" >"$dst" ;;
    *)
        echo "build-guest: unknown module format $p" >&2
        exit 1
        ;;
    esac
    LOADLIST="$LOADLIST ${base%%.ko*}"
done

# ---- /init ---------------------------------------------------------------
cat >"$ROOT/init" <<EOF
#!/bin/sh
# Generated by ci/build-guest.sh for kernel $KVER.
MODULES="$LOADLIST"
EOF
cat >>"$ROOT/init" <<'EOF'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
echo 1 >/proc/sys/kernel/printk
exec </dev/ttyS0 >/dev/ttyS0 2>&1
for m in $MODULES; do
    insmod /lib/modules/$m.ko || echo "init: insmod $m failed"
done
hostname vmcrypt-guest
stty raw -echo
echo
echo VMCRYPT-GUEST-READY
# The command loop is PID 1's child, not PID 1: PID 1 adopts every orphan
# (a background job a command left, a `dd` whose loop a test killed), and
# each orphan's exit is a SIGCHLD to PID 1. busybox's `read` restarts after
# a signal but drops the bytes it had already read, so a command arriving
# at that moment lost its head and never started. PID 1 only waits here,
# which also reaps the orphans.
while true; do
    sh /bin/vmcrypt-agent
    echo "init: the command loop exited ($?), restarting it"
done
EOF
cat >"$ROOT/bin/vmcrypt-agent" <<'EOF'
#!/bin/sh
while true; do
    line=
    if ! IFS= read -r line; then
        sleep 1
        continue
    fi
    # Tolerate a stray carriage return.
    line=${line%"$(printf '\r')"}
    id=${line%% *}
    b64=${line#* }
    [ -n "$line" ] && [ "$id" != "$line" ] || continue
    echo "__VMCRYPT_BEGIN__ $id"
    if echo "$b64" | base64 -d >/tmp/.cmd 2>/dev/null; then
        (cd /root && sh /tmp/.cmd) </dev/null 2>&1
        status=$?
    else
        echo "init: bad base64 command"
        status=254
    fi
    echo "__VMCRYPT_DONE__ $id $status"
done
EOF
chmod 755 "$ROOT/init" "$ROOT/bin/vmcrypt-agent"

# ---- pack ----------------------------------------------------------------
if command -v cpio >/dev/null; then
    CPIO=(cpio --quiet -o -H newc -R 0:0)
else
    CPIO=("$BUSYBOX" cpio -o -H newc)
fi
(cd "$ROOT" && find . -print | LC_ALL=C sort | "${CPIO[@]}") | gzip -6n >"$WORK/initramfs.cpio.gz"
cp "$KERNEL" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
echo "$STAMP_WANT" >"$OUTDIR/stamp"
echo "build-guest: $OUTDIR (kernel $KVER, modules:$LOADLIST)" >&2
