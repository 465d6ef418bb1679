#!/usr/bin/env bash
# Soak bench (issue 8): measure the peak request rate of a mixed workload,
# then hold 80 % of it for SOAK_MINUTES with valid, unauthenticated and
# over-limit traffic, sampling the server's resident memory; then check
#   - unexpected 5xx answers: 0
#   - resident memory growth after warm-up: < 5 %
#   - the audit chain verifies (`moat audit verify`) and holds one request
#     record per request answered.
#   bench/soak/run.sh
# Env: SOAK_MINUTES (default 10), PEAK_SECONDS (15), PEAK_CONCURRENCY (8),
#      SOAK_FRACTION (0.8), MOAT_BIN (a moat binary to use instead of
#      building the release one), BENCH_WORK (scratch folder).
# Needs python3 with httpx (the test venv ~/.cache/moat/venv has it; made
# here from scripts/requirements-test.txt if missing). Exit 0 when every
# check holds, 1 otherwise; the full JSON results are in $WORK/soak.json.
source "$(dirname "$0")/../common.sh"
VENV="${MOAT_TEST_VENV:-$HOME/.cache/moat/venv}"
if [ -z "${PYTHON:-}" ] && [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/python" -m pip install -q -r "$ROOT/scripts/requirements-test.txt"
fi
PY="${PYTHON:-$VENV/bin/python}"
mkdir -p "$WORK"
MINUTES="${SOAK_MINUTES:-10}"
PEAK_SECONDS="${PEAK_SECONDS:-15}"
FRACTION="${SOAK_FRACTION:-0.8}"
if [ -n "${MOAT_BIN:-}" ]; then
  MOAT="$MOAT_BIN"
else
  build_release
  # Pin this build: a shared target folder may be rebuilt by another checkout.
  cp "$MOAT" "$WORK/moat" && MOAT="$WORK/moat"
fi
store="$WORK/store"
if [ ! -d "$store/models/tiny" ]; then
  "$MOAT" demo-model "$WORK/src-tiny" --preset tiny --seed 1 >/dev/null
  "$MOAT" pull "file://$WORK/src-tiny" --name tiny --store "$store" >/dev/null
fi
# An admin key without limits (valid traffic) and a user key whose role
# allows 30 requests/min (the over-limit traffic).
SOAK_KEY="$("$MOAT" keys create --role admin --store "$store" 2>/dev/null)"
SOAK_LIMITED_KEY="$("$MOAT" keys create --role user --store "$store" 2>/dev/null)"
export SOAK_KEY SOAK_LIMITED_KEY
rm -rf "$store/audit"
cat > "$WORK/soak.toml" <<TOML
home = "$store"
[[models]]
name = "tiny"
[engine]
queue_capacity = 1024
[audit]
# One file for the whole run (no rotation), so one verify covers it.
max_bytes = 4294967296
[rate_limits.roles.user]
requests_per_minute = 30
TOML
start_server "$WORK/soak.toml"
trap 'stop_server' EXIT
BASE="${BASE_URL%/v1}"

echo "== peak: ${PEAK_SECONDS}s closed loop, ${PEAK_CONCURRENCY:-8} clients, mixed traffic" >&2
"$PY" "$ROOT/bench/soak/load.py" peak --base-url "$BASE" --seconds "$PEAK_SECONDS" \
  --concurrency "${PEAK_CONCURRENCY:-8}" > "$WORK/peak.json"
peak_rps="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["rps"])' "$WORK/peak.json")"
rate="$("$PY" -c "print(round($peak_rps * $FRACTION, 1))")"
seconds=$((MINUTES * 60))
warmup=$((seconds / 5))
echo "== peak ${peak_rps} req/s; soak at ${rate} req/s for ${MINUTES} min (warm-up ${warmup}s)" >&2
"$PY" "$ROOT/bench/soak/load.py" soak --base-url "$BASE" --seconds "$seconds" --rate "$rate" \
  --pid "$SERVER_PID" --warmup "$warmup" --sample 5 > "$WORK/soak-load.json"
stop_server
trap - EXIT

verify_out="$("$MOAT" audit verify "$store/audit/audit.jsonl" --keys "$store/audit-keys.json" 2>&1)" \
  && verify_ok=true || verify_ok=false
status=0
"$PY" - "$WORK" "$verify_ok" "$verify_out" "$store/audit/audit.jsonl" <<'PY' || status=$?
import json, sys
work, verify_ok, verify_out, audit = sys.argv[1], sys.argv[2] == "true", sys.argv[3], sys.argv[4]
peak = json.load(open(f"{work}/peak.json"))
soak = json.load(open(f"{work}/soak-load.json"))
records = [json.loads(l) for l in open(audit) if l.strip()]
request_records = sum(1 for r in records if r.get("request_id"))
answered = peak["answered"] + soak["answered"]
client_errors = peak["client_errors"] + soak["client_errors"]
growth = soak["rss_kib"]["growth_pct"]
checks = {
    "no unexpected 5xx": soak["5xx"] == 0 and peak["unexpected"] == {} and soak["unexpected"] == {},
    "no client errors or cut streams": client_errors == 0 and soak["incomplete_streams"] == 0,
    "RSS growth after warm-up < 5 %": growth is not None and growth < 5.0,
    "audit chain verifies": verify_ok,
    "audit request records == requests answered": request_records == answered,
}
result = {"peak_rps": round(peak["rps"], 1), "soak": {k: v for k, v in soak.items() if k != "rss_kib"},
          "rss_kib": soak["rss_kib"], "audit": {"records": len(records), "request_records": request_records,
          "requests_answered": answered, "verify": verify_out.strip().splitlines()[-1:]},
          "checks": checks}
json.dump(result, open(f"{work}/soak.json", "w"), indent=1)
print(f"peak (mixed traffic, closed loop):   {peak['rps']:.1f} req/s")
print(f"soak: target {soak['rate_target']} req/s, achieved {soak['achieved_rps']} req/s over {soak['seconds']} s")
print(f"  answered {soak['answered']}, statuses {json.dumps(soak['statuses'], sort_keys=True)}")
print(f"  unexpected {soak['unexpected'] or 'none'}, 5xx {soak['5xx']}, client errors {client_errors}, "
      f"cut streams {soak['incomplete_streams']}")
print(f"  latency p50 {soak['latency_ms']['p50']} ms, p99 {soak['latency_ms']['p99']} ms")
r = soak["rss_kib"]
print(f"  RSS after warm-up {r['baseline_after_warmup']} KiB -> end {r['end']} KiB: {growth:+.2f} %")
print(f"audit: {len(records)} records, {request_records} request records for {answered} requests answered; "
      f"verify: {'ok' if verify_ok else 'FAILED'}")
for name, ok in checks.items():
    print(f"  [{'ok' if ok else 'FAIL'}] {name}")
sys.exit(0 if all(checks.values()) else 1)
PY
echo "(results: $WORK/soak.json)"
exit $status
