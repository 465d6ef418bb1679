#!/usr/bin/env bash
# moat's CPU engine against llama.cpp on the same file, same run, same
# thread count (issue 9, Measure): a random-weight GGUF with
# DeepSeek-R1-Distill-Qwen-1.5B's exact shapes (tests/engine/make_gguf.py,
# F16, cached), quantised by llama.cpp's llama-quantize to Q8_0 and Q4_0.
#
#   bench/engine.sh
#
# For each type, alternating llama.cpp and moat, ROUNDS times:
#   llama.cpp: llama-bench -t $THREADS -p 512 -n 0 -r 3, then -p 0 -n 64 -d 512 -r 3
#   moat:      probe --model F --threads $THREADS bench --prompt-tokens 512 --gen-tokens 64 --reps 3
# then moat's aggregate decode with 8 concurrent streams vs 1 (probe
# `bench --streams 8`: 8 sequences decoded by one batched forward per step),
# and prints a markdown table: prompt and decode tok/s,
# moat/llama.cpp ratios, and decode as a % of the memory-bandwidth bound
# (read bandwidth measured here ÷ bytes of weights read per token, i.e. the
# GGUF's tensor bytes without token_embd).
#
# Env: THREADS (2), ROUNDS (2), TYPES ("Q8_0 Q4_0"), ARCH (qwen2 | llama:
# the same sizes as a Llama), SHAPE (r1-1.5b | tiny: a smoke test of the script), SKIP_MOAT=1 (llama.cpp only), MOAT_PROBE (a
# prebuilt probe; default: cargo build --release of the example), BENCH_WORK,
# WAIT_IDLE (seconds to wait for the 1-minute load average to fall below 0.5
# before measuring; default 0).
# Run it on an otherwise idle machine: two threads on a 2-core machine leave
# no slack, and llama.cpp's decode (a thread barrier per op) slows several
# fold when another process takes a core. The table's header prints the load
# average at the start and at the end of the measurements.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moat/target}"
VENV="${MOAT_TEST_VENV:-$HOME/.cache/moat/venv}"
PY="${PYTHON:-$VENV/bin/python}"
CACHE="${MOAT_CACHE:-$HOME/.cache/moat}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-2}"
TYPES="${TYPES:-Q8_0 Q4_0}"
ARCH="${ARCH:-qwen2}"
SHAPE="${SHAPE:-r1-1.5b}"
WORK="${BENCH_WORK:-$(mktemp -d /tmp/moat-bench-engine-XXXXXX)}"
export OPENBLAS_NUM_THREADS=1
log() { printf 'engine.sh: %s\n' "$*" >&2; }

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r "$ROOT/scripts/requirements-test.txt"
fi
LLAMA="$("$ROOT/scripts/llama_cpp.sh" "$VENV")"

models="$CACHE/bench-engine/$ARCH-$SHAPE-seed1"
mkdir -p "$models"
if [ ! -f "$models/model-f16.gguf" ]; then
  log "writing the $ARCH $SHAPE-shape F16 GGUF (r1-1.5b: 3.6 GB, once)"
  "$PY" "$ROOT/tests/engine/make_gguf.py" --arch "$ARCH" --shape "$SHAPE" --seed 1 --out "$models" --formats f16 >&2
fi
for q in $TYPES; do
  if [ ! -f "$models/model-$q.gguf" ]; then
    log "llama-quantize F16 -> $q (once)"
    "$LLAMA/bin/llama-quantize" "$models/model-f16.gguf" "$models/model-$q.gguf.tmp" "$q" >"$WORK/quantize-$q.log" 2>&1 \
      || { tail -20 "$WORK/quantize-$q.log" >&2; exit 1; }
    mv "$models/model-$q.gguf.tmp" "$models/model-$q.gguf"
  fi
done

PROBE=""
if [ "${SKIP_MOAT:-0}" != 1 ]; then
  if [ -n "${MOAT_PROBE:-}" ]; then
    PROBE="$MOAT_PROBE"
  else
    (cd "$ROOT" && cargo build --release --locked -p moat-engine --example probe >&2)
    PROBE="$CARGO_TARGET_DIR/release/examples/probe"
  fi
fi

if [ "${WAIT_IDLE:-0}" -gt 0 ]; then
  deadline=$(($(date +%s) + WAIT_IDLE))
  while awk '{exit !($1 >= 0.5)}' /proc/loadavg && [ "$(date +%s)" -lt "$deadline" ]; do sleep 10; done
fi

results="$WORK/results.jsonl"
: >"$results"
bw="$("$PY" "$ROOT/bench/engine.py" bandwidth --threads "$THREADS")"
cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
"$PY" - "$results" "$bw" "$cpu" "$THREADS" "$(cut -d' ' -f1-3 /proc/loadavg)" "$(cat "$LLAMA/built.ok")" $TYPES <<'EOF'
import json, sys
out, bw, cpu, threads, load, commit, *types = sys.argv[1:]
bw = json.loads(bw)
with open(out, "a") as f:
    f.write(json.dumps({"kind": "meta", "cpu": cpu, "threads": int(threads), "load": load,
                        "llama_cpp": commit, "read_gbs": bw["read_gbs"], "copy_gbs": bw["copy_gbs"],
                        "types": types}) + "\n")
EOF
for q in $TYPES; do
  printf '{"kind":"weights","type":"%s","weight_bytes":%s}\n' "$q" \
    "$("$PY" "$ROOT/bench/engine.py" weight-bytes "$models/model-$q.gguf")" >>"$results"
done

for round in $(seq 1 "$ROUNDS"); do
  for q in $TYPES; do
    log "round $round/$ROUNDS, $q: llama-bench"
    # Two runs so both engines measure the same thing: prompt processing from
    # an empty cache, and decode after the 512-token prompt (-d 512; probe
    # decodes after its prompt, llama-bench's plain tg64 starts empty).
    "$LLAMA/bin/llama-bench" -m "$models/model-$q.gguf" -t "$THREADS" -p 512 -n 0 -r 3 -o json \
      >"$WORK/llama-bench-pp-$q-$round.json" 2>"$WORK/llama-bench-$q-$round.log" \
      || { tail -20 "$WORK/llama-bench-$q-$round.log" >&2; exit 1; }
    "$LLAMA/bin/llama-bench" -m "$models/model-$q.gguf" -t "$THREADS" -p 0 -n 64 -d 512 -r 3 -o json \
      >"$WORK/llama-bench-tg-$q-$round.json" 2>>"$WORK/llama-bench-$q-$round.log" \
      || { tail -20 "$WORK/llama-bench-$q-$round.log" >&2; exit 1; }
    "$PY" - "$WORK/llama-bench-pp-$q-$round.json" "$WORK/llama-bench-tg-$q-$round.json" "$q" >>"$results" <<'EOF'
import json, sys
pp = json.load(open(sys.argv[1]))[0]["avg_ts"]
tg = json.load(open(sys.argv[2]))[0]["avg_ts"]
print(json.dumps({"kind": "llama.cpp", "type": sys.argv[3], "prompt_tok_s": pp, "decode_tok_s": tg}))
EOF
    if [ -n "$PROBE" ]; then
      log "round $round/$ROUNDS, $q: moat probe bench"
      "$PROBE" --model "$models/model-$q.gguf" --threads "$THREADS" bench --prompt-tokens 512 --gen-tokens 64 \
        --reps 3 >"$WORK/probe-$q-$round.json"
      "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); d.update(kind="moat", type=sys.argv[2]); print(json.dumps(d))' \
        "$WORK/probe-$q-$round.json" "$q" >>"$results"
    fi
  done
done

if [ -n "$PROBE" ]; then
  for q in $TYPES; do
    log "$q: moat decode, 1 stream and 8 concurrent streams (one batched forward per step)"
    "$PROBE" --model "$models/model-$q.gguf" --threads "$THREADS" bench --prompt-tokens 16 --gen-tokens 64 \
      --reps 3 --streams 8 >"$WORK/streams-$q.json"
    "$PY" - "$q" "$WORK/streams-$q.json" >>"$results" <<'EOF'
import json, sys
d = json.load(open(sys.argv[2]))
print(json.dumps({"kind": "streams", "type": sys.argv[1], "one": round(d["decode_tok_s"], 1),
                  "eight": round(d["aggregate_decode_tok_s"], 1)}))
EOF
  done
fi

printf '{"kind":"end","load":"%s"}\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$results"
"$PY" "$ROOT/bench/engine.py" table "$results"
echo
echo "(raw results: $results)"
