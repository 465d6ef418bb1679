#!/usr/bin/env bash
# Overhead of moat's upstream proxy path against nginx proxying the same
# upstream. The upstream is nginx itself answering a fixed chat completion
# (plain JSON) and a fixed five-chunk SSE stream, so the upstream costs
# next to nothing and what differs is the proxy:
#   direct  wrk → upstream
#   nginx   wrk → nginx (proxy_pass, keepalive 64, proxy_buffering off) → upstream
#   moat    wrk → moat (API key, RBAC, rate limits, audit, request log,
#           metrics; models with backend = "upstream") → upstream
# Prints requests/s and p50/p99 latency for each, plain and streamed.
# Needs nginx and wrk (Debian packages nginx, wrk).
#   bench/upstream_proxy.sh [--seconds S] [--connections C]
source "$(dirname "$0")/common.sh"
SECONDS_EACH=10
CONNS=16
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    --connections) CONNS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk" >&2; exit 2; }
build_release
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PLAIN=$(port); UP_SSE=$(port); PX_PLAIN=$(port); PX_SSE=$(port)
PLAIN='{"id":"up","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,"message":{"role":"assistant","content":"hello from nginx"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}'
SSE='data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\ndata: {"choices":[{"index":0,"delta":{"content":"hello"}}]}\n\ndata: {"choices":[{"index":0,"delta":{"content":" from"}}]}\n\ndata: {"choices":[{"index":0,"delta":{"content":" nginx"},"finish_reason":"stop"}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\ndata: [DONE]\n\n'
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/ptemp;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP_PLAIN;
    location = /v1/models { default_type application/json; return 200 '{"object":"list","data":[]}'; }
    location = /v1/chat/completions { default_type application/json; return 200 '$PLAIN'; }
  }
  server {
    listen 127.0.0.1:$UP_SSE;
    location = /v1/models { default_type application/json; return 200 '{"object":"list","data":[]}'; }
    location = /v1/chat/completions { default_type text/event-stream; return 200 '$SSE'; }
  }
  upstream up_plain { server 127.0.0.1:$UP_PLAIN; keepalive 64; }
  upstream up_sse { server 127.0.0.1:$UP_SSE; keepalive 64; }
  server {
    listen 127.0.0.1:$PX_PLAIN;
    location / { proxy_pass http://up_plain; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
  server {
    listen 127.0.0.1:$PX_SSE;
    location / { proxy_pass http://up_sse; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK"
mkdir -p "$WORK/home"
KEY=$("$MOAT" keys create --role user --keys-file "$WORK/keys.json" 2>/dev/null | head -1)
cat >"$WORK/moat.toml" <<TOML
home = "$WORK/home"
keys_file = "$WORK/keys.json"
[rate_limits]
requests_per_minute = 100000000
tokens_per_minute = 1000000000
[[models]]
name = "plain"
backend = "upstream"
[[models.upstreams]]
url = "http://127.0.0.1:$UP_PLAIN/v1"
[[models]]
name = "sse"
backend = "upstream"
[[models.upstreams]]
url = "http://127.0.0.1:$UP_SSE/v1"
TOML
start_server "$WORK/moat.toml"
trap 'stop_server; kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; rm -rf "$WORK"' EXIT
for m in plain sse; do
  stream=false; [ "$m" = sse ] && stream=true
  cat >"$WORK/$m.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"$m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":$stream}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA
done
MOAT_ADDR="${BASE_URL%/v1}"
printf '%-8s %-6s %12s %10s %10s\n' path kind "requests/s" p50 p99
for kind in plain sse; do
  if [ "$kind" = plain ]; then up=$UP_PLAIN; px=$PX_PLAIN; else up=$UP_SSE; px=$PX_SSE; fi
  for target in "direct http://127.0.0.1:$up" "nginx http://127.0.0.1:$px" "moat $MOAT_ADDR"; do
    set -- $target
    out=$(wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" --latency -s "$WORK/$kind.lua" "$2/v1/chat/completions")
    if echo "$out" | grep -q "Non-2xx"; then echo "$1 $kind: non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
    printf '%-8s %-6s %12s %10s %10s\n' "$1" "$kind" \
      "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
      "$(echo "$out" | awk '$1=="50%" {print $2}')" \
      "$(echo "$out" | awk '$1=="99%" {print $2}')"
  done
done
