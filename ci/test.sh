#!/bin/bash
# Runs vmcrypt's whole test suite on this machine: installs the system
# packages, builds the Debian package and installs it (apt), checks the
# package as an operator meets it (ci/package-check.sh), then runs the unit
# and end-to-end tests (real QEMU guests, two libvirt hosts) against the
# installed binaries and hook (VMCRYPT_INSTALLED=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install-deps.sh
bash ci/package.sh --install
bash ci/package-check.sh
cargo build --workspace --bins
VMCRYPT_INSTALLED=1 cargo test --workspace -- --test-threads=2
