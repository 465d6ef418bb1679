"""OTLP trace export, end to end: a real `moat serve` with `[tracing]`
pointing at a loopback OTLP/HTTP receiver, whose bodies are decoded with the
official OpenTelemetry protobuf bindings (`opentelemetry-proto`), so moat's
hand-written encoder is checked against the real schema, not against itself.

Proves: one chat completion yields the root server span and the admission,
queue, prefill and decode spans, children of the root, in the caller's
trace (`traceparent`), carrying the request id moat answered in
`x-request-id`; a refused request yields a denied admission; and when the
collector goes away requests are still answered while the spans are
dropped and counted.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from moat_bin import moat_binary  # noqa: E402

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
except ImportError:  # a missing decoder must fail the suite, not skip it
    pb = None

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """An OTLP/HTTP trace receiver: decodes every POST /v1/traces."""

    def __init__(self):
        self.spans = []  # (resource attrs dict, span)
        self.content_types = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = pb.ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.content_types.append(self.headers["Content-Type"])
                    for rs in req.resource_spans:
                        res = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                receiver.spans.append((res, s))
                out = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def spans_of(self, request_id, want, timeout=15.0):
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [(r, s) for r, s in self.spans if attrs(s).get("moat.request_id") == request_id]
            if len(found) >= want or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def attrs(span):
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


def run(*args):
    p = subprocess.run([moat_binary(), *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def traced():
    if pb is None:
        pytest.fail("opentelemetry-proto is missing: pip install -r scripts/requirements-test.txt")
    receiver = Receiver()
    work = tempfile.mkdtemp(prefix="moat-otlp-")
    home = os.path.join(work, "home")
    model = os.path.join(work, "model")
    run("demo-model", model, "--seed", "1")
    run("pull", f"file://{model}", "--name", "demo", "--store", home)
    key = run("keys", "create", "--role", "admin", "--store", home).strip()
    port, mport = free_port(), free_port()
    config = os.path.join(work, "moat.toml")
    with open(config, "w") as f:
        f.write(f'home = "{home}"\n[[models]]\nname = "demo"\n'
                f'[tracing]\notlp_endpoint = "http://127.0.0.1:{receiver.port}"\n'
                f'service_name = "moat-test"\nexport_timeout = "1s"\n')
    log = open(os.path.join(work, "moat.log"), "w")
    proc = subprocess.Popen(
        [moat_binary(), "serve", "--config", config, "--listen", f"127.0.0.1:{port}",
         "--metrics-listen", f"127.0.0.1:{mport}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moat did not start:\n" + open(log.name).read()[-3000:])
            time.sleep(0.1)
    try:
        yield receiver, base, f"http://127.0.0.1:{mport}/metrics", key, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, open(log.name).read()[-3000:]
        receiver.stop()


def post_chat(base, key, headers=None, stream=False):
    body = {"model": "demo", "max_tokens": 6, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": "Tell me about moats."}]}
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers["x-request-id"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["x-request-id"], e.read().decode()


def test_one_streamed_chat_is_one_trace_with_every_phase(traced):
    receiver, base, _, key, _ = traced
    status, rid, text = post_chat(base, key, stream=True,
                                  headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})
    assert status == 200 and text.rstrip().endswith("data: [DONE]"), text
    found = receiver.spans_of(rid, 5)
    by_name = {s.name: (res, s) for res, s in found}
    assert sorted(by_name) == sorted(
        ["POST /v1/chat/completions", "admission", "queue", "prefill", "decode"]), by_name.keys()
    res, root = by_name["POST /v1/chat/completions"]
    assert res["service.name"] == "moat-test"
    # The caller's trace continues: same trace id, the caller's span is the parent.
    assert root.trace_id.hex() == TRACE_ID
    assert root.parent_span_id.hex() == PARENT_SPAN
    assert root.kind == root.SPAN_KIND_SERVER
    a = attrs(root)
    assert a["moat.request_id"] == rid
    assert a["http.route"] == "/v1/chat/completions"
    assert a["http.response.status_code"] == 200
    assert a["gen_ai.request.model"] == "demo"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.usage.input_tokens"] > 0
    assert 1 <= a["gen_ai.usage.output_tokens"] <= 6
    assert a["moat.principal.id"] and not a["moat.principal.id"].startswith("moat_")
    for name in ["admission", "queue", "prefill", "decode"]:
        s = by_name[name][1]
        assert s.trace_id == root.trace_id and s.parent_span_id == root.span_id, name
        assert root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano \
            <= root.end_time_unix_nano, name
    assert attrs(by_name["admission"][1])["moat.admission.outcome"] == "allowed"
    assert attrs(by_name["decode"][1])["gen_ai.usage.output_tokens"] == a["gen_ai.usage.output_tokens"]
    # Phases in order: queue, then prefill, then decode.
    q, p, d = (by_name[n][1] for n in ["queue", "prefill", "decode"])
    assert q.end_time_unix_nano <= p.start_time_unix_nano + 1
    assert p.end_time_unix_nano <= d.start_time_unix_nano + 1
    assert set(receiver.content_types) == {"application/x-protobuf"}
    # Secrets never appear in any span.
    with receiver.lock:
        for _, s in receiver.spans:
            assert key not in str(s)


def test_a_new_trace_without_traceparent_and_a_refused_request(traced):
    receiver, base, _, key, _ = traced
    status, rid, _ = post_chat(base, key)
    assert status == 200
    root = next(s for _, s in receiver.spans_of(rid, 5) if s.name.startswith("POST"))
    assert root.parent_span_id == b"" and root.trace_id.hex() != TRACE_ID
    status, rid, _ = post_chat(base, None)
    assert status == 401
    found = {s.name: s for _, s in receiver.spans_of(rid, 2)}
    assert sorted(found) == ["POST /v1/chat/completions", "admission"], found.keys()
    a = attrs(found["admission"])
    assert a["moat.admission.outcome"] == "denied"
    assert a["moat.rejection.stage"] == "auth"


def metric(metrics_url, key, name):
    req = urllib.request.Request(metrics_url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_a_dead_collector_costs_requests_nothing_and_spans_are_counted_dropped(traced):
    receiver, base, metrics_url, key, proc = traced
    assert metric(metrics_url, key, "moat_trace_spans_exported_total") > 0
    receiver.stop()
    before = metric(metrics_url, key, "moat_trace_spans_dropped_total")
    started = time.monotonic()
    for _ in range(3):
        status, _, _ = post_chat(base, key)
        assert status == 200
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 10
    while metric(metrics_url, key, "moat_trace_spans_dropped_total") < before + 15:
        assert time.monotonic() < deadline, "dropped spans were not counted"
        time.sleep(0.2)
    assert proc.poll() is None


def test_kv_cache_gauges_are_exported_per_model(traced):
    _, _, metrics_url, key, _ = traced
    req = urllib.request.Request(metrics_url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("moat_engine_kv_cache") and '{model="demo"}' in line:
            name, value = line.split('{model="demo"} ')
            values[name] = float(value)
    assert values["moat_engine_kv_cache_capacity_tokens"] > 0, text
    per_token = values["moat_engine_kv_cache_capacity_bytes"] / values["moat_engine_kv_cache_capacity_tokens"]
    assert per_token == int(per_token) and per_token > 0
    # Idle between requests: the worker holds no cache.
    assert values["moat_engine_kv_cache_tokens"] == 0
    assert values["moat_engine_kv_cache_bytes"] == 0
