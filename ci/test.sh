#!/bin/bash
# Runs vmcrypt's whole test suite on this machine: installs the system
# packages, builds, and runs unit and end-to-end tests (real QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install-deps.sh
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2
