#!/bin/bash
# The vmcrypt demo: an encrypted disk for a real QEMU guest, on the embedded
# defaults. Installs what it needs, builds, and runs target/release/vmcrypt-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install-deps.sh >/dev/null
cargo build --release --workspace --bins --quiet
VMCRYPT_PROFILE=release exec target/release/vmcrypt-demo "$@"
