#!/usr/bin/env bash
# Runs every test: the Rust workspace (engine parity against the diffusers fixtures, CLI, server,
# app, the model download against a local hub), the build plans of scripts/studio.sh, the browser
# tests against a real server, the Redis queue on real processes, the script APIs with their own
# clients, and the load harness at CI size. Installs what it needs first, each step skipped when
# already there (system libraries, wasm toolchain, Chromium, Playwright), so a fresh machine needs
# nothing else.
#
# One native build serves every stage: `cargo test` builds the workspace once (debug profile, the
# dependencies optimised) and its `target/debug/zimage` is the server the browser, Redis, client
# and load stages start; the release profile is not built here (scripts/studio.sh builds it).
# Each stage's time is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=()
stage_start=$(date +%s)
begin() { stage_name=$1; stage_start=$(date +%s); echo "== $1"; }
# free disk after each stage: a full disk shows up as a linker "Bus error" (lld writes through mmap)
free_disk() { df -h . | awk 'NR==2 {print $4}'; }
end() { STAGES+=("$(printf '%6ss  %s (disk free after: %s)' "$(( $(date +%s) - stage_start ))" "$stage_name" "$(free_disk)")"); }
report() {
  echo "== stage times"
  for s in "${STAGES[@]}"; do echo "$s"; done
  echo "$(printf '%6ss  %s' "$(( $(date +%s) - all_start ))" "total")"
}
all_start=$(date +%s)
trap 'report' EXIT
# the workspace's test build, the site and the tools take about 12 GB
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((12 * 1024 * 1024)) ]; then
  echo "warning: only $(free_disk) free on this disk; the build needs about 12 GB and may fail with a linker Bus error" >&2
fi

begin "setup (system libraries, wasm toolchain, Chromium, Playwright)"
if ! dpkg -s libssl-dev pkg-config >/dev/null 2>&1; then
  echo "== installing libssl-dev and pkg-config"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y libssl-dev pkg-config
fi
scripts/ci-web-setup.sh
end

begin "build plans of scripts/studio.sh (fake nvidia-smi)"
scripts/tests/build-plan.sh
end

begin "cargo test --workspace"
cargo test --workspace --locked
end
export ZIMAGE_BIN=$PWD/target/debug/zimage

begin "site (wasm front end) and browser tests (Playwright + Chromium)"
scripts/e2e.sh
end

begin "Redis queue: two front ends, two workers, a worker killed, a front end restarted"
scripts/redis-cluster-test.sh
end

begin "script APIs with their own clients (openai, webuiapi)"
scripts/api-clients.sh
end

begin "load and abuse harness, CI size (scripts/load/run.sh --quick)"
scripts/load/run.sh --quick
end
