#!/usr/bin/env bash
# Runs every test of the workspace, after installing what the tests need.
# Run it as root on a machine with /dev/kvm: the tests boot real microVMs.
# With CI=true a test whose requirement is missing fails instead of skipping.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh runs as root: the tests create namespaces, cgroups, device nodes and TAP devices" >&2
  exit 1
fi
"$root/scripts/install-packages.sh"
"$root/scripts/install-firecracker.sh"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
