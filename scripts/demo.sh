#!/usr/bin/env bash
# The main job in one command: installs the pinned Firecracker, builds the
# test guest, and boots a microVM through the metald library, printing its
# console, its state changes and how long each step took.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/install-packages.sh"
"$root/scripts/install-firecracker.sh"
cargo run --release --locked -p metald-examples --example boot_demo
