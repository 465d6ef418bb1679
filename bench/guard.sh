#!/usr/bin/env bash
# What moat's guard costs in front of a fast upstream, against nginx (Debian)
# reverse-proxying the same upstream, in the same run with the same tools:
#
#   upstream  nginx answering a fixed chat completion (the fastest upstream
#             this machine can have, so the proxies' own cost shows);
#   nginx     nginx proxying to it (keep-alive pool, 2 workers);
#   hyper     crates/moat-server/examples/bare_proxy.rs: hyper's server and
#             pooled client on tokio, 2 workers, nothing else: the floor
#             for any proxy built on the stack moat uses;
#   moat      `moat serve` proxying to it with the guard fully on: API key,
#             RBAC, per-principal rate limit (set high enough never to
#             trip, so every request pays for the check), TLS off;
#             measured with the audit log off and on.
#
# 1. Latency at a fixed rate (RATE, default 5,000 req/s): the open-loop
#    generator crates/moat-server/examples/loadgen.rs measures each request
#    from the instant it was due, in microseconds. Added latency = proxy p50
#    (p99) − upstream-direct p50 (p99) in the same round.
# 2. Throughput: wrk, closed loop (CONNS connections, SECONDS s), nginx vs moat.
# ROUNDS rounds (default 3), targets interleaved; medians reported.
#   bench/guard.sh
source "$(dirname "$0")/common.sh"
RATE="${RATE:-5000}"
SECONDS_EACH="${SECONDS_EACH:-10}"
ROUNDS="${ROUNDS:-3}"
CONNS="${CONNS:-64}"
command -v nginx >/dev/null && command -v wrk >/dev/null || {
  echo "needs nginx and wrk: apt-get install -y nginx-light wrk" >&2; exit 2; }
build_release
(cd "$ROOT" && cargo build --release --locked -p moat-server --example loadgen --example bare_proxy >&2)
LOADGEN="$CARGO_TARGET_DIR/release/examples/loadgen"
BARE="$CARGO_TARGET_DIR/release/examples/bare_proxy"
trap 'stop_all; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port); NGX_PORT=$(free_port); BARE_PORT=$(free_port)
COMPLETION='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'

mkdir -p "$WORK/nginx-up" "$WORK/nginx-proxy"
cat >"$WORK/nginx-up/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx-up/pid;
error_log $WORK/nginx-up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx-up/body;
  server {
    listen 127.0.0.1:$UP_PORT;
    default_type application/json;
    location = /v1/chat/completions { return 200 '$COMPLETION'; }
    location = /v1/models { return 200 '{"object":"list","data":[{"id":"bench","object":"model","created":0,"owned_by":"bench"}]}'; }
    location / { return 200 '{}'; }
  }
}
EOF
cat >"$WORK/nginx-proxy/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $WORK/nginx-proxy/pid;
error_log $WORK/nginx-proxy/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx-proxy/body;
  proxy_temp_path $WORK/nginx-proxy/proxy;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
nginx -c "$WORK/nginx-up/nginx.conf" -e "$WORK/nginx-up/error.log" & UP_PID=$!
nginx -c "$WORK/nginx-proxy/nginx.conf" -e "$WORK/nginx-proxy/error.log" & NGX_PID=$!
"$BARE" "127.0.0.1:$BARE_PORT" "http://127.0.0.1:$UP_PORT/v1/chat/completions" & BARE_PID=$!

KEYS="$WORK/keys.json"
KEY=$("$MOAT" keys --keys-file "$KEYS" create --role user --models bench 2>/dev/null | grep -o 'moat_[A-Za-z0-9_]*' | head -1)
[ -n "$KEY" ] || { echo "could not create a key" >&2; exit 1; }
moat_config() { # $1 = audit on|off
  cat <<EOF
home = "$WORK/home-$1"
keys_file = "$KEYS"
[rate_limits]
requests_per_minute = 100000000
burst = 1000000
[[models]]
name = "bench"
backend = "upstream"
[[models.upstreams]]
url = "http://127.0.0.1:$UP_PORT/v1"
EOF
  # The audit log (on by default) is durable: group commit with fsync.
  [ "$1" = off ] && printf '[audit]\nenabled = false\n'
  true
}
moat_config off >"$WORK/moat-off.toml"
moat_config on >"$WORK/moat-on.toml"

stop_all() {
  kill "$UP_PID" "$NGX_PID" "$BARE_PID" 2>/dev/null || true
  [ -n "${SERVER_PID:-}" ] && stop_server
  wait 2>/dev/null || true
}
for _ in $(seq 50); do
  curl -fsS "http://127.0.0.1:$UP_PORT/v1/models" >/dev/null 2>&1 && curl -fsS "http://127.0.0.1:$NGX_PORT/v1/models" >/dev/null 2>&1 && curl -fsS -d "{}" "http://127.0.0.1:$BARE_PORT/" >/dev/null 2>&1 && break
  sleep 0.1
done

BODY="$WORK/body.json"
echo '{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":16}' >"$BODY"
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = [[$(cat "$BODY")]]
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer $KEY"
EOF

fixed_rate() { # URL → JSON line (loadgen, open loop)
  "$LOADGEN" --url "$1" --rate "$RATE" --seconds "$SECONDS_EACH" --warmup 2 --connections 50 \
    --header "authorization: Bearer $KEY" --body-file "$BODY"
}
throughput() { # URL → requests/s
  wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" -s "$WORK/post.lua" "$1" | awk '/^Requests\/sec/ {print $2}'
}

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
  for audit in off on; do
    start_server "$WORK/moat-$audit.toml"
    MOAT_URL="$BASE_URL/chat/completions"
    curl -fsS -H "authorization: Bearer $KEY" -H 'content-type: application/json' -d @"$BODY" "$MOAT_URL" >/dev/null \
      || { echo "moat does not proxy:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
    for target in direct nginx hyper moat; do
      case $target in
        direct) url="http://127.0.0.1:$UP_PORT/v1/chat/completions" ;;
        nginx) url="http://127.0.0.1:$NGX_PORT/v1/chat/completions" ;;
        hyper) url="http://127.0.0.1:$BARE_PORT/v1/chat/completions" ;;
        moat) url="$MOAT_URL" ;;
      esac
      [ "$audit" = on ] && [ "$target" != moat ] && continue
      name=$target; [ "$target" = moat ] && name="moat-audit-$audit"
      lat=$(fixed_rate "$url")
      rps=$( [ "$target" = direct ] && echo 0 || throughput "$url")
      echo "{\"round\":$round,\"target\":\"$name\",\"wrk_rps\":${rps:-0},\"fixed\":$lat}" >>"$RESULTS"
      echo "round $round $name: $lat wrk=${rps} req/s" >&2
    done
    stop_server
  done
done

python3 - "$RESULTS" "$RATE" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rate = sys.argv[2]
by = {}
for r in rows:
    by.setdefault(r["target"], []).append(r)
med = lambda xs: statistics.median(xs)
base50 = {r["round"]: r["fixed"]["p50_us"] for r in by["direct"]}
base99 = {r["round"]: r["fixed"]["p99_us"] for r in by["direct"]}
print(f"fixed rate {rate} req/s, medians of {len(by['direct'])} rounds")
print("| target | achieved req/s | p50 µs | p99 µs | added p50 µs | added p99 µs | non-2xx+errors | wrk req/s |")
print("|---|---|---|---|---|---|---|---|")
for t in ["direct", "nginx", "hyper", "moat-audit-off", "moat-audit-on"]:
    rs = by.get(t, [])
    if not rs:
        continue
    f = [r["fixed"] for r in rs]
    bad = sum(sum(v for k, v in x["statuses"].items() if not k.startswith("2")) + x["errors"] for x in f)
    a50 = med([r["fixed"]["p50_us"] - base50[r["round"]] for r in rs])
    a99 = med([r["fixed"]["p99_us"] - base99[r["round"]] for r in rs])
    wrk = med([r["wrk_rps"] for r in rs])
    print(f"| {t} | {med([x['achieved_rate'] for x in f]):.0f} | {med([x['p50_us'] for x in f]):.0f} | "
          f"{med([x['p99_us'] for x in f]):.0f} | {a50:.0f} | {a99:.0f} | {bad} | {wrk:.0f} |")
n = med([r["wrk_rps"] for r in by["nginx"]])
for t in ["hyper", "moat-audit-off", "moat-audit-on"]:
    if t in by:
        m = med([r["wrk_rps"] for r in by[t]])
        print(f"{t} throughput / nginx = {m / n:.2f}×")
EOF
