#!/usr/bin/env bash
# Chunked AES-256-GCM (moat-artifact::crypto) throughput on a 1 GiB file:
# encrypt and decrypt, one thread and all cores, warm page cache, output to
# a sink (what an encrypted model load does), median of RUNS (default 3).
#   bench/crypto.sh [SIZE_MIB]   (1024 default)
source "$(dirname "$0")/common.sh"
mib="${1:-1024}"
(cd "$ROOT" && cargo build --release --locked -p moat-artifact --example crypto_bench >&2)
"$CARGO_TARGET_DIR/release/examples/crypto_bench" "$WORK/crypto" "$mib" "${RUNS:-3}"
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu: /'
echo "(scratch folder: $WORK)"
