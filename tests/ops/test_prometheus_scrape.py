"""A real Prometheus scrapes a real moat under a short load: the request
histogram, token counters and queue metrics arrive with the labels the
alert rules and dashboard expect, and moat's shipped alert rules load and
evaluate without error against the live data."""

import threading
import time

WAIT_S = 30.0


def wait_for(prometheus, expr, check=lambda r: bool(r)):
    """Poll an instant query until `check(result)` holds (bounded)."""
    deadline = time.monotonic() + WAIT_S
    result = None
    while time.monotonic() < deadline:
        result = prometheus.query(expr)
        if check(result):
            return result
        time.sleep(0.5)
    raise AssertionError(f"{expr} never satisfied within {WAIT_S} s; last result {result}\n"
                         f"prometheus log:\n{prometheus.log()}")


def chat(moat, **extra):
    body = {"model": "demo", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about moats."}]}
    body.update(extra)
    return moat.request("POST", "/v1/chat/completions", body)


def test_prometheus_scrapes_moat_under_load(moat, prometheus):
    wait_for(prometheus, 'up{job="moat"} == 1')
    # A short load from four clients: plain and streamed completions, plus
    # refusals (no key, bad request).
    statuses = []

    def client(i):
        for j in range(3):
            statuses.append(chat(moat, stream=(j == 1))[0])
        statuses.append(moat.request("POST", "/v1/chat/completions", {"model": "demo"}, key=None)[0])
        statuses.append(chat(moat, n=99)[0])  # over engine.max_n: 400

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 12 + [400] * 4 + [401] * 4, statuses

    # The request histogram, with plane/route/status/model labels.
    buckets = wait_for(
        prometheus,
        'moat_http_request_duration_seconds_bucket{job="moat",plane="inference",'
        'route="/v1/chat/completions",status="200",model="demo",le="+Inf"}',
        lambda r: r and float(r[0]["value"][1]) >= 12,
    )
    assert buckets[0]["metric"]["instance"]
    # Quantiles computed by Prometheus itself from moat's buckets.
    p99 = wait_for(prometheus, 'histogram_quantile(0.99, sum by (le) (rate('
                   'moat_http_request_duration_seconds_bucket{route="/v1/chat/completions"}[1m])))')
    assert float(p99[0]["value"][1]) > 0

    # Tokens.
    gen = wait_for(prometheus, 'moat_generated_tokens_total{model="demo"}',
                   lambda r: r and float(r[0]["value"][1]) >= 12)
    assert gen[0]["metric"]["model"] == "demo"
    wait_for(prometheus, 'moat_prompt_tokens_total{model="demo"} > 0')
    wait_for(prometheus, 'moat_time_to_first_token_seconds_count{model="demo"} >= 12')
    wait_for(prometheus, 'moat_inter_token_latency_seconds_count{model="demo"} >= 1')

    # The queue: depth and capacity gauges, and a wait per admitted request.
    depth = wait_for(prometheus, 'moat_engine_queue_depth{model="demo"}')
    assert float(depth[0]["value"][1]) >= 0
    wait_for(prometheus, 'moat_engine_queue_capacity{model="demo"} > 0')
    wait_for(prometheus, 'moat_engine_queue_wait_seconds_count{model="demo"} >= 12')

    # Refusals by stage and reason; in flight by plane; process figures.
    wait_for(prometheus, 'moat_rejections_total{stage="auth",reason="missing_key"} >= 4')
    wait_for(prometheus, 'moat_rejections_total{stage="validation",reason="invalid_request"} >= 4')
    wait_for(prometheus, 'moat_http_requests_in_flight{plane="inference"}')
    wait_for(prometheus, 'moat_model_verifications_total{model="demo",check="hashes",result="ok"} == 1')
    wait_for(prometheus, 'process_resident_memory_bytes{job="moat"} > 0')
    wait_for(prometheus, 'rate(process_cpu_seconds_total{job="moat"}[10s]) >= 0')


def test_shipped_alert_rules_evaluate_cleanly(moat, prometheus):
    """Every rule of deploy/prometheus/alerts.yml loaded and evaluated
    against live moat data without an error (a wrong name would not error,
    but a wrong type or bad PromQL would; names are checked in
    test_dashboard_and_alerts_use_real_metrics)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        evaluated = [r for r in rules if r.get("lastEvaluation", "").startswith("0001") is False]
        if rules and len(evaluated) == len(rules):
            break
        assert time.monotonic() < deadline, groups
        time.sleep(0.5)
    names = {r["name"] for r in rules}
    assert {"MoatP99LatencyHigh", "Moat5xxRateHigh", "MoatQueueSaturated", "MoatAuthFailureSpike",
            "MoatRateLimitSpike", "MoatModelVerificationFailed", "MoatAuditWriteFailures"} <= names
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # A healthy demo under this load fires none of them.
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    assert not firing, firing
