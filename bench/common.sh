# Shared by the bench scripts: build the release binary, make a scratch
# folder, and start/stop `moat serve` on free ports.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moat/target}"
MOAT="$CARGO_TARGET_DIR/release/moat"
WORK="${BENCH_WORK:-$(mktemp -d /tmp/moat-bench-XXXXXX)}"

build_release() {
  (cd "$ROOT" && cargo build --release --locked -p moat >&2)
}

# start_server CONFIG_FILE → sets SERVER_PID and BASE_URL
start_server() {
  local log="$WORK/serve.log"
  # Emptied here, not by the background job's redirection: that may run
  # after the grep below, which would then find the previous server's port.
  : >"$log"
  "$MOAT" serve --config "$1" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$WORK/requests.jsonl" 2>"$log" &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    if grep -q 'inference plane listening' "$log"; then
      BASE_URL="http://$(grep 'inference plane listening' "$log" | sed 's/.*addr=//' | tr -d '[:space:]')/v1"
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.5
  done
  echo "server did not start" >&2; return 1
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}
