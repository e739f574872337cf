#!/bin/bash
# Installs the Debian packages vmcrypt's demo, tests and benchmarks need.
# Safe to run again: apt skips what is installed. Needs root.
#
# Trap (see shared ENVIRONMENT.md): installing qemu-system-x86 (7.2) removes
# the preinstalled qemu-utils 10, so qemu-utils is installed again afterwards
# to get qemu-img/qemu-io back, in the version that matches QEMU.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
command -v cpio >/dev/null || need+=(cpio)
command -v flock >/dev/null || need+=(util-linux)
# The two-host libvirt harness (ci/hosts.sh): namespaces, veth, libvirt.
command -v ip >/dev/null || need+=(iproute2)
command -v libvirtd >/dev/null || need+=(libvirt-daemon-system)
command -v virsh >/dev/null || need+=(libvirt-clients)
dpkg -s libvirt-dev >/dev/null 2>&1 || need+=(libvirt-dev)
# Real-host tests: VMs made the way operators make them, and the AppArmor
# rules the package ships, parsed (this kernel cannot load AppArmor).
command -v virt-install >/dev/null || need+=(virtinst)
command -v apparmor_parser >/dev/null || need+=(apparmor)
command -v setpriv >/dev/null || need+=(util-linux)
[ -x /usr/bin/python3 ] || need+=(python3)
# LUKS interop: cryptsetup reads vmcrypt's images (tests/tests/luks_interop.rs).
command -v cryptsetup >/dev/null || need+=(cryptsetup-bin)
# Transparent migration: the daemon's netfilter rules (the package depends
# on iptables too), and OpenStack Nova's libvirt calls replayed through the
# libvirt Python binding (tests/scripts/nova_live_migrate.py).
command -v iptables >/dev/null || need+=(iptables)
# Roles (saved_state.rs): a system D-Bus per test host (ci/hosts.sh), polkit
# (libvirt lets group libvirt in through it) and pkexec (vmcrypt-admin's key
# commands run through it; the package recommends it).
[ -f /usr/share/dbus-1/system.conf ] && command -v dbus-daemon >/dev/null || need+=(dbus)
[ -x /usr/lib/polkit-1/polkitd ] || need+=(polkitd)
command -v pkexec >/dev/null || need+=(pkexec)
# vTPM (saved_state.rs): swtpm emulates an encrypted VM's TPM (the package
# recommends it).
command -v swtpm >/dev/null || need+=(swtpm)
# blk_switchover.rs watches vmcrypt-blk sync the image (strace).
command -v strace >/dev/null || need+=(strace)
dpkg -s python3-libvirt >/dev/null 2>&1 || need+=(python3-libvirt)
# The KMIP tests: openssl makes their certificates; PyKMIP runs in a venv.
command -v openssl >/dev/null || need+=(openssl)
PYKMIP_VENV=/opt/pykmip-venv
if [ ! -x "$PYKMIP_VENV/bin/pykmip-server" ]; then
    command -v python3 >/dev/null || need+=(python3)
    dpkg -s python3-venv >/dev/null 2>&1 || need+=(python3-venv)
fi

# qemu-img/qemu-io must match QEMU 7.2 (and exist at all after the trap).
# Some images carry a manually installed qemu-utils 10 that Breaks
# qemu-system-common 7.2; apt will not resolve that by itself ("Resolve
# generated breaks"), so the 7.2 qemu-utils is named with its version and
# installed in the same transaction, as a downgrade.
if ! command -v qemu-io >/dev/null || ! qemu-img --version | grep -q "version 7\."; then
    need+=(qemu-utils)
fi
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q
    qemu7=$(apt-cache madison qemu-utils | awk -F'|' '$2 ~ /^ *1:7\./ {gsub(/ /, "", $2); print $2; exit}')
    for i in "${!need[@]}"; do
        if [ "${need[$i]}" = qemu-utils ] && [ -n "$qemu7" ]; then
            need[$i]="qemu-utils=$qemu7"
        fi
    done
    echo "install-deps: installing ${need[*]}"
    apt-get install -y -q --no-install-recommends --allow-downgrades "${need[@]}"
fi
# PyKMIP, the KMIP server the tests start (tests/src/kmip.rs; VMCRYPT_PYKMIP
# points elsewhere if wanted).
if [ ! -x "$PYKMIP_VENV/bin/pykmip-server" ]; then
    echo "install-deps: installing PyKMIP in $PYKMIP_VENV"
    python3 -m venv "$PYKMIP_VENV"
    "$PYKMIP_VENV/bin/pip" install -q pykmip
fi
qemu-system-x86_64 --version | head -1
qemu-img --version | head -1
