#!/bin/bash
# The vmcrypt demo: two libvirt hosts, an encrypted VM, encrypted live
# migration, on the embedded defaults. Installs what it needs, builds and
# installs the Debian package (the demo uses the installed binaries and
# hook), and runs target/release/vmcrypt-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install-deps.sh >/dev/null
bash ci/package.sh --install >/dev/null
cargo build --release --workspace --bins --quiet
VMCRYPT_INSTALLED=1 VMCRYPT_PROFILE=release exec target/release/vmcrypt-demo "$@"
