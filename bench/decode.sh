#!/usr/bin/env bash
# Decode speed and time to first token of the embedded engine, through the
# real server and the official openai SDK (streaming), on demo models.
#   bench/decode.sh [tiny|r1-distill-qwen-1.5b ...]   (default: both)
# Env: RUNS (default 5), MAX_TOKENS (default 64 tiny / 32 1.5B), BENCH_WORK.
# Uses the venv of scripts/test.sh (~/.cache/moat/venv, created here with
# the `openai` SDK if missing), or $PYTHON.
source "$(dirname "$0")/common.sh"
VENV="${MOAT_TEST_VENV:-$HOME/.cache/moat/venv}"
if [ -z "${PYTHON:-}" ] && [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/python" -m pip install -q -r "$ROOT/scripts/requirements-test.txt"
fi
PY="${PYTHON:-$VENV/bin/python}"
presets=("$@"); [ ${#presets[@]} -gt 0 ] || presets=(tiny r1-distill-qwen-1.5b)
build_release
store="$WORK/store"
for p in "${presets[@]}"; do
  if [ ! -d "$store/models/$p" ]; then
    "$MOAT" demo-model "$WORK/src-$p" --preset "$p" --seed 1 >/dev/null
    "$MOAT" pull "file://$WORK/src-$p" --name "$p" --store "$store"
  fi
done
export OPENAI_API_KEY="$("$MOAT" keys create --role admin --store "$store" 2>/dev/null)"
for p in "${presets[@]}"; do
  printf 'home = "%s"\n[[models]]\nname = "%s"\n' "$store" "$p" > "$WORK/$p.toml"
  start_server "$WORK/$p.toml"
  default_max=64; [ "$p" = tiny ] || default_max=32
  "$PY" "$ROOT/bench/decode.py" --base-url "$BASE_URL" --model "$p" \
    --runs "${RUNS:-5}" --max-tokens "${MAX_TOKENS:-$default_max}"
  stop_server
done
echo "(scratch folder: $WORK)"
