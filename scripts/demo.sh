#!/usr/bin/env bash
# README's first command: installs what metald needs (Debian packages, the
# pinned Firecracker), builds metald, metalctl and the test guest, and runs
# the platform demo: a metald daemon in a scratch folder on its defaults,
# a tenant, two VMs created through metalctl with an IPv6 interface each,
# their console, their state changes and how long each step took, the
# operator's usage summary, and everything removed at the end.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh runs as root: metald's jailer and networking make namespaces, cgroups, TAP devices and nftables rules" >&2
  exit 1
fi
"$root/scripts/install-packages.sh"
"$root/scripts/install-firecracker.sh"
cargo build --release --locked -p metald -p metalctl
cargo build --release --locked -p metald-examples --example platform_demo
"$root/target/release/examples/platform_demo" --bin-dir "$root/target/release"
