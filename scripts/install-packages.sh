#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need, when missing:
# gcc and binutils build the test guest; iproute2 (ip) makes the tests' TAP
# devices and network namespaces; nftables (nft) applies metald's firewall;
# clickhouse-server is the real ClickHouse the billing tests start on loopback
# (the package does not start it; each test runs its own); postgresql is
# the real PostgreSQL 15 the fleet store's tests start the same way.
set -euo pipefail

needed=()
command -v gcc >/dev/null 2>&1 || needed+=(gcc)
command -v ld >/dev/null 2>&1 || needed+=(binutils)
command -v ip >/dev/null 2>&1 || needed+=(iproute2)
command -v nft >/dev/null 2>&1 || needed+=(nftables)
[ -x /usr/sbin/clickhouse-server ] || needed+=(clickhouse-server clickhouse-client)
[ -x /usr/lib/postgresql/15/bin/postgres ] || needed+=(postgresql)

if [ "${#needed[@]}" -gt 0 ]; then
  echo "Installing ${needed[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${needed[@]}"
fi
