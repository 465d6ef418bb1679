#!/usr/bin/env bash
# Audit append latency with durable group commit: 8 appenders at 5,000
# records/s (p50/p99, records/s, records per fsync), the same without fsync,
# flat out, and submit-without-waiting; plus the bare fdatasync cost of the
# disk. Runs in a scratch folder on the checkout's disk (not a tmpfs, where
# fsync costs nothing).
#   bench/audit.sh [--threads N] [--rate R] [--seconds S]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moat/target}"
(cd "$ROOT" && cargo build --release --locked -p moat-audit --example audit_bench >&2)
WORK="${BENCH_WORK:-$ROOT/target/bench-audit}"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
"$CARGO_TARGET_DIR/release/examples/audit_bench" "$WORK" "$@"
