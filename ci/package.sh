#!/bin/bash
# Builds vmcrypt's Debian package: release binaries, then cargo-deb
# (installed into ~/.cargo/bin from crates.io when missing).
#
#   ci/package.sh            -> target/debian/vmcrypt_VERSION_ARCH.deb (path printed)
#   ci/package.sh --install  ... and installs it with apt-get
#
# CARGO_TARGET_DIR is honoured (default: target/).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
install=no
case "${1:-}" in
--install) install=yes ;;
"") ;;
*) echo "usage: $0 [--install]" >&2; exit 2 ;;
esac
if ! cargo deb --version >/dev/null 2>&1; then
    echo "package: installing cargo-deb" >&2
    cargo install cargo-deb --locked --quiet
fi
target=${CARGO_TARGET_DIR:-target}
cargo build --release --workspace --bins --quiet
rm -f "$target"/debian/vmcrypt_*.deb
# Stripped: the release profile keeps line tables for profiling.
cargo deb -p vmcrypt-cli --no-build --strip --quiet >/dev/null
deb=$(ls -t "$target"/debian/vmcrypt_*.deb | head -n 1)
echo "$deb"
# apt-get takes a file only as a path ("./..." or absolute).
case "$deb" in /*) ;; *) deb=./$deb ;; esac
if [ "$install" = yes ]; then
    # --reinstall: a rebuilt package of the same version must replace the
    # installed one (apt skips it otherwise).
    apt-get install -y -q --reinstall "$deb" >/dev/null
    # What is installed must be this build (same GNU build id as target/release).
    for b in vmcrypt vmcrypt-hook vmcrypt-blk vmcrypt-migrate; do
        built=$(readelf -n "$target/release/$b" | sed -n 's/.*Build ID: //p')
        inst=$(readelf -n "/usr/bin/$b" | sed -n 's/.*Build ID: //p')
        [ -n "$built" ] && [ "$built" = "$inst" ] || {
            echo "package: /usr/bin/$b is not this build ($inst vs $built)" >&2
            exit 1
        }
    done
    echo "package: installed $(dpkg-query -W -f '${Package} ${Version}' vmcrypt)" >&2
fi
