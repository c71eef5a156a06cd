#!/usr/bin/env bash
# Runs every test of the workspace, after installing what the tests need.
# Run it as root on a machine with /dev/kvm: the tests boot real microVMs.
# With CI=true a test whose requirement is missing fails instead of skipping.
#
# Formatting and clippy stop it at the first problem. The tests then all
# run (a failing test binary does not stop the others); their output goes
# to the console and to target/test.log, and the last line says
# "N passed, M failed, K skipped" over every test binary. The exit status
# is cargo test's.
#
# Sourced (`source scripts/test.sh`), it only defines its functions, so
# summarize_test_log can be tried on a saved log.

# One line over every "test result: ... N passed; M failed; K ignored"
# line cargo wrote to the log: "N passed, M failed, K skipped", skipped
# being cargo's ignored tests. When cargo failed ($2 not 0) and no test
# did, the build did: that counts as one failure.
summarize_test_log() {
  local log="$1" cargo_status="$2"
  awk -v cargo_status="$cargo_status" '
    { sub(/\r$/, "") }
    /^test result: / {
      for (i = 2; i <= NF; i++) {
        word = $i
        sub(/;$/, "", word)
        if (word == "passed") passed += $(i - 1)
        else if (word == "failed") failed += $(i - 1)
        else if (word == "ignored") ignored += $(i - 1)
      }
    }
    END {
      if (cargo_status != 0 && failed == 0) failed = 1
      printf "%d passed, %d failed, %d skipped\n", passed, failed, ignored
    }
  ' "$log"
}

main() {
  local root log statuses cargo_status
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

  log="$root/target/test.log"
  mkdir -p "$(dirname "$log")"
  # Not stopped by set -e: the summary comes whatever cargo's verdict.
  set +e
  cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
  statuses=("${PIPESTATUS[@]}")
  set -e
  cargo_status=${statuses[0]}
  # A linker that ran out of disk says so in a line CI logs may cut.
  df -h . | sed 's/^/disk after the tests: /'
  if [ "${statuses[1]}" -ne 0 ]; then
    echo "scripts/test.sh: could not write $log; the counts below may be short" >&2
  fi
  summarize_test_log "$log" "$cargo_status"
  return "$cargo_status"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  main "$@"
fi
