#!/bin/bash
# Checks the Debian package the way an operator meets it, with apt and dpkg:
# it installs, puts every file where docs/design.md says, `apt-get remove` and
# `apt-get purge` leave the keys (encrypted VMs stay recoverable) and purge
# says where they are; it is installed again at the end.
#
#   ci/package-check.sh [DEB]      (default: the newest target/debian/vmcrypt_*.deb)
#
# Needs root. Changes this machine: it removes, purges and reinstalls the
# vmcrypt package. A keystore that exists before is kept byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

deb=${1:-$(ls -t target/debian/vmcrypt_*.deb 2>/dev/null | head -n 1)}
[ -n "$deb" ] && [ -f "$deb" ] || { echo "package-check: no .deb (run ci/package.sh first)" >&2; exit 1; }
deb=$(readlink -f "$deb")
fail() { echo "package-check: FAIL: $*" >&2; exit 1; }
ok() { echo "package-check: ok: $*"; }

apt-get install -y -q --reinstall "$deb" >/tmp/vmcrypt-package-check.log 2>&1 || {
    cat /tmp/vmcrypt-package-check.log >&2
    fail "apt-get install $deb"
}
ok "installed $(dpkg-query -W -f '${Package} ${Version}' vmcrypt)"

for f in /usr/bin/vmcrypt /usr/bin/vmcrypt-hook /usr/bin/vmcrypt-blk /usr/bin/vmcrypt-migrate \
    /usr/libexec/vmcrypt/qemu-system-x86_64 \
    /etc/libvirt/hooks/qemu.d/vmcrypt; do
    [ -x "$f" ] || fail "$f is missing or not executable"
done
dpkg -L vmcrypt | grep -q 'vmcrypt-migrate.service$' || fail "no systemd unit in the package"
dpkg -L vmcrypt | grep -q 'vmcrypt-guests.service$' || fail "no vmcrypt-guests unit in the package"
[ -d /var/lib/vmcrypt/saved ] && [ "$(stat -c %a /var/lib/vmcrypt/saved)" = 700 ] || fail "/var/lib/vmcrypt/saved is not 0700"
dpkg -L vmcrypt | grep -q 'tmpfiles.d/vmcrypt.conf$' || fail "no tmpfiles.d entry in the package"
[ "$(stat -c %a /var/lib/vmcrypt)" = 700 ] || fail "/var/lib/vmcrypt is $(stat -c %a /var/lib/vmcrypt), not 0700"
[ "$(stat -c %U /var/lib/vmcrypt)" = root ] || fail "/var/lib/vmcrypt is not root's"
/usr/bin/vmcrypt --version >/dev/null || fail "vmcrypt --version"
/usr/bin/vmcrypt-blk --help >/dev/null || fail "vmcrypt-blk --help"
getent group vmcrypt-admin >/dev/null || fail "the package made no group vmcrypt-admin"
[ -f /usr/share/polkit-1/actions/org.vmcrypt.policy ] && [ -f /usr/share/polkit-1/rules.d/60-vmcrypt.rules ] ||
    fail "the polkit action and rule for vmcrypt-admin are not installed"
ok "files in place; /var/lib/vmcrypt is root's 0700; group vmcrypt-admin and its polkit rule"

# The unit: systemd-analyze prints nothing for a clean unit (it exits 0 even
# for settings it ignores, so its output is what counts). PID 1 is not
# systemd on every machine this runs on, so the unit cannot be started here;
# the daemon it runs is exercised by the end-to-end tests.
if command -v systemd-analyze >/dev/null; then
    for u in vmcrypt-migrate.service vmcrypt-guests.service; do
        out=$(systemd-analyze verify "/lib/systemd/system/$u" 2>&1) || fail "systemd-analyze verify $u: $out"
        [ -z "$out" ] || fail "systemd-analyze verify $u: $out"
    done
    exposure=$(systemd-analyze security --offline=yes /lib/systemd/system/vmcrypt-migrate.service 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    ok "unit verified; systemd's exposure score ${exposure:-?} (0 = most sandboxed, 10 = none)"
fi

# Keys: a keystore made through the installed CLI must outlive remove and
# purge. (A keystore already there is saved and put back.)
saved=
if [ -e /var/lib/vmcrypt/keystore.json ]; then
    saved=$(mktemp)
    cp -a /var/lib/vmcrypt/keystore.json "$saved"
fi
img=$(mktemp -d)/disk.img
truncate -s 4M "$img"
/usr/bin/vmcrypt encrypt "$img" >/dev/null || fail "vmcrypt encrypt with the embedded provider"
before=$(sha256sum /var/lib/vmcrypt/keystore.json | cut -d' ' -f1)

apt-get remove -y -q vmcrypt >/tmp/vmcrypt-package-check.log 2>&1 || fail "apt-get remove"
[ -f /var/lib/vmcrypt/keystore.json ] || fail "apt-get remove deleted the keystore"
[ "$(sha256sum /var/lib/vmcrypt/keystore.json | cut -d' ' -f1)" = "$before" ] || fail "apt-get remove changed the keystore"
[ ! -e /usr/bin/vmcrypt ] || fail "apt-get remove left /usr/bin/vmcrypt"
ok "apt-get remove kept the keystore"
# remove keeps the hook (a conffile) but not vmcrypt-hook: plain VMs must
# still start, vmcrypt's must be refused with a reason.
hook=/etc/libvirt/hooks/qemu.d/vmcrypt
[ -x "$hook" ] || fail "remove took the hook conffile away (purge does that)"
echo "<domain><name>plain</name></domain>" | "$hook" plain prepare begin - ||
    fail "the leftover hook refuses a plain VM"
if err=$(echo '<domain><name>enc</name><metadata><vmcrypt:vm xmlns:vmcrypt="urn:vmcrypt:domain:1"/></metadata></domain>' |
    "$hook" enc prepare begin - 2>&1); then
    fail "the leftover hook lets a vmcrypt VM start without vmcrypt"
fi
case "$err" in *reinstall*) ;; *) fail "the leftover hook's refusal says: $err" ;; esac
ok "after remove, the leftover hook passes plain VMs and refuses vmcrypt ones"

apt-get install -y -q "$deb" >/tmp/vmcrypt-package-check.log 2>&1 || fail "reinstall"
apt-get purge -y -q vmcrypt >/tmp/vmcrypt-package-check.log 2>&1 || fail "apt-get purge"
[ -f /var/lib/vmcrypt/keystore.json ] || fail "apt-get purge deleted the keystore"
[ "$(sha256sum /var/lib/vmcrypt/keystore.json | cut -d' ' -f1)" = "$before" ] || fail "apt-get purge changed the keystore"
grep -q '/var/lib/vmcrypt' /tmp/vmcrypt-package-check.log || fail "purge did not say where the keystore is"
ok "apt-get purge kept the keystore and said where it is"

apt-get install -y -q "$deb" >/tmp/vmcrypt-package-check.log 2>&1 || fail "final reinstall"
# The image made above still opens with its key after all that.
/usr/bin/vmcrypt decrypt "$img" >/dev/null || fail "the key did not survive remove/purge"
rm -rf "$(dirname "$img")"
if [ -n "$saved" ]; then
    cp -a "$saved" /var/lib/vmcrypt/keystore.json
    rm -f "$saved"
fi
ok "reinstalled; the image encrypted before remove/purge still decrypts"
