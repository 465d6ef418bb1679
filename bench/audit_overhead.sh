#!/usr/bin/env bash
# Audit overhead at the server, and encrypted model load throughput.
#
# 1. `moat serve` (release) with the demo model; authenticated `GET
#    /v1/models` (the full middleware: network, auth, rate limit, audit;
#    no engine work) at a fixed RATE (default 5,000 req/s) from
#    crates/moat-server/examples/loadgen.rs (wrk2-style: latency from
#    each request's due time). Three modes, interleaved ROUNDS times in the
#    same run: audit off, audit on (default: durable, fail-open `submit`),
#    audit on with fail_closed (each request waits for its fsync). Reports
#    p50/p99 per mode and the added latency vs off (median over rounds).
# 2. `moat verify` of a SIZE_MIB safetensors model stored plain and stored
#    encrypted (`pull --encrypt`), warm page cache, on one core (taskset)
#    and on all cores: verify decrypts and hashes exactly as a load does.
#
#   bench/audit_overhead.sh      env: RATE SECONDS CONNS ROUNDS SIZE_MIB RUNS PIN
source "$(dirname "$0")/common.sh"
RATE="${RATE:-5000}"
# PIN=1: the server on core 1, the load generator on core 0 (taskset), so
# the generator's own scheduling does not land in the server's latency.
if [ "${PIN:-0}" = 1 ]; then SERVER_PIN=(taskset -c 1); LOAD_PIN=(taskset -c 0); else SERVER_PIN=(); LOAD_PIN=(); fi
SECS="${SECONDS_PER_RUN:-${SECS:-10}}"
CONNS="${CONNS:-64}"
ROUNDS="${ROUNDS:-3}"
SIZE_MIB="${SIZE_MIB:-1024}"
RUNS="${RUNS:-3}"
trap 'stop_server 2>/dev/null; rm -rf "$WORK"' EXIT

# One cargo run for both (it holds the target lock throughout), then
# private copies: a build in another checkout sharing CARGO_TARGET_DIR must
# not swap the binaries under this run.
(cd "$ROOT" && cargo build --release --locked -p moat -p moat-server --bin moat --example loadgen >&2)
cp "$MOAT" "$WORK/moat-bin"
cp "$CARGO_TARGET_DIR/release/examples/loadgen" "$WORK/loadgen"
MOAT="$WORK/moat-bin"
LOAD="$WORK/loadgen"
"$MOAT" pull --help | grep -q -- '--encrypt' || { echo "$MOAT is not this checkout's build (no pull --encrypt)" >&2; exit 2; }

STORE="$WORK/store"
"$MOAT" demo-model "$WORK/demo" >/dev/null
"$MOAT" pull "file://$WORK/demo" --name demo --store "$STORE" --progress none >/dev/null
KEY="$("$MOAT" keys create --role user --store "$STORE" 2>/dev/null)"

config() { # MODE → config file
  local f="$WORK/$1.toml"
  {
    echo "home = \"$STORE\""
    echo "[log]"
    echo "requests = \"$WORK/requests-$1.jsonl\""
    echo "[[models]]"
    echo "name = \"demo\""
    case "$1" in
      off) printf '[audit]\nenabled = false\n' ;;
      on) printf '[audit]\nfile = "%s/audit-on/audit.jsonl"\n' "$WORK" ;;
      fail_closed) printf '[audit]\nfile = "%s/audit-fc/audit.jsonl"\nfail_closed = true\n' "$WORK" ;;
    esac
  } >"$f"
  echo "$f"
}

# Like common.sh's start_server, with one log per run kept for a post-mortem.
start_logged() { # CONFIG LOG → SERVER_PID, BASE_URL
  "${SERVER_PIN[@]}" "$MOAT" serve --config "$1" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >/dev/null 2>"$2" &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    if grep -q 'inference plane listening' "$2"; then
      BASE_URL="http://$(grep 'inference plane listening' "$2" | sed 's/.*addr=//' | tr -d '[:space:]')/v1"
      return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID"; echo "server exited with $? at start; its log:" >&2; cat "$2" >&2; return 1
    fi
    sleep 0.2
  done
  echo "server did not start; its log:" >&2; cat "$2" >&2; return 1
}

declare -A P50 P99 RPS
for round in $(seq 1 "$ROUNDS"); do
  for mode in off on fail_closed; do
    start_logged "$(config "$mode")" "$WORK/serve-$mode-$round.log"
    url="${BASE_URL}/models"
    # 2 s of warm-up at the same rate, not counted.
    out="$("${LOAD_PIN[@]}" "$LOAD" --url "$url" --rate "$RATE" --seconds "$SECS" --warmup 2 --connections "$CONNS" \
      --header "authorization: Bearer $KEY")" || { echo "load run failed: $out" >&2; exit 1; }
    stop_server
    echo "round $round $mode: $out" >&2
    P50[$mode]+="$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["p50_us"])') "
    P99[$mode]+="$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["p99_us"])') "
    RPS[$mode]+="$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["achieved_rate"])') "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "audit overhead: GET /v1/models (authenticated) at $RATE req/s, $CONNS connections, ${SECS}s x $ROUNDS rounds"
printf '%-12s %10s %10s %10s %14s %14s\n' mode "req/s" "p50 µs" "p99 µs" "+p50 vs off" "+p99 vs off"
off50="$(echo "${P50[off]}" | median)"; off99="$(echo "${P99[off]}" | median)"
for mode in off on fail_closed; do
  p50="$(echo "${P50[$mode]}" | median)"; p99="$(echo "${P99[$mode]}" | median)"
  printf '%-12s %10s %10s %10s %14s %14s\n' "$mode" "$(echo "${RPS[$mode]}" | median)" "$p50" "$p99" \
    "$((p50 - off50))" "$((p99 - off99))"
done
echo "(per round: p50 ${P50[off]}| ${P50[on]}| ${P50[fail_closed]}; p99 ${P99[off]}| ${P99[on]}| ${P99[fail_closed]})"

# 2. Encrypted vs plain model load (verify = read + decrypt + SHA-256).
SRC="$WORK/big"
mkdir -p "$SRC"
python3 - "$SRC/model.safetensors" "$SIZE_MIB" <<'PY'
import json, os, struct, sys
path, mib = sys.argv[1], int(sys.argv[2])
n = mib << 20
header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
header += b" " * (-len(header) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header)
    left = n
    while left:
        k = min(left, 64 << 20)
        f.write(os.urandom(k))
        left -= k
PY
"$MOAT" keys rotate-kek --store "$WORK/enc" >/dev/null
"$MOAT" pull "file://$SRC" --name big --store "$WORK/plain" --progress none >/dev/null
"$MOAT" pull "file://$SRC" --name big --store "$WORK/enc" --encrypt --progress none >/dev/null
bytes=$(stat -c %s "$SRC/model.safetensors")
time_verify() { # STORE CPUS → median seconds
  local t=()
  "$MOAT" verify big --store "$1" >/dev/null # warm the page cache
  for _ in $(seq 1 "$RUNS"); do
    local s e
    s=$(date +%s.%N)
    taskset -c "$2" "$MOAT" verify big --store "$1" >/dev/null
    e=$(date +%s.%N)
    t+=("$(echo "$e - $s" | bc -l)")
  done
  printf '%s\n' "${t[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
all="0-$(($(nproc) - 1))"
echo
echo "model load (moat verify: read + [decrypt] + SHA-256), $SIZE_MIB MiB, warm cache, median of $RUNS"
printf '%-10s %-6s %10s %12s\n' store cores seconds "MB/s"
for store in plain enc; do
  for cpus in 0 "$all"; do
    s="$(time_verify "$WORK/$store" "$cpus")"
    printf '%-10s %-6s %10.3f %12.0f\n' "$store" "$( [ "$cpus" = 0 ] && echo 1 || nproc)" "$s" "$(echo "$bytes / $s / 1000000" | bc -l)"
  done
done
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu: /'
