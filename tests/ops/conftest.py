"""Fixtures for the operations tests: one `moat serve --demo` on loopback
(ephemeral ports; its admin key is printed on stdout) and one real
`prometheus` server (the Debian binary) scraping moat's metrics plane every
second, with moat's shipped alert rules loaded. Storage lives in a temp
folder; both processes are stopped at the end of the session.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import pytest

from moat_bin import moat_binary  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 60.0




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moat:
    def __init__(self, proc, base_url, metrics_url, api_key):
        self.proc = proc
        self.base_url = base_url  # ends with /v1
        self.metrics_url = metrics_url
        self.api_key = api_key

    def request(self, method, path, body=None, key="default", timeout=60):
        """(status, text) of one request to the inference plane."""
        headers = {"Content-Type": "application/json"}
        if key == "default":
            key = self.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url.removesuffix("/v1") + path, data=data,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> str:
        req = urllib.request.Request(self.metrics_url,
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()


@pytest.fixture(scope="session")
def moat():
    proc = subprocess.Popen(
        [moat_binary(), "serve", "--demo", "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, errors="replace",
    )
    lines, ready = [], threading.Event()

    def drain_out():
        for line in iter(proc.stdout.readline, ""):
            lines.append(line.rstrip("\n"))
            if line.startswith("# metrics:"):
                ready.set()
        ready.set()

    err_tail = []

    def drain_err():
        for line in iter(proc.stderr.readline, ""):
            err_tail.append(line)
            del err_tail[:-100]

    threading.Thread(target=drain_out, daemon=True).start()
    threading.Thread(target=drain_err, daemon=True).start()
    if not ready.wait(STARTUP_TIMEOUT_S) or proc.poll() is not None:
        proc.kill()
        pytest.fail("moat serve --demo did not start:\n" + "".join(err_tail[-30:]))
    base = key = metrics = None
    for line in lines:
        if line.startswith("export OPENAI_BASE_URL="):
            base = line.split("=", 1)[1].strip()
        elif line.startswith("export OPENAI_API_KEY="):
            key = line.split("=", 1)[1].strip()
        elif line.startswith("# metrics:"):
            metrics = next(p for p in line.split() if p.startswith("http"))
    assert base and key and metrics, lines
    try:
        yield Moat(proc, base, metrics, key)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail("moat did not exit within 20 s of SIGTERM")
        assert code == 0, "".join(err_tail[-30:])


class Prometheus:
    def __init__(self, url, proc, log_path):
        self.url = url
        self.proc = proc
        self.log_path = log_path

    def api(self, path, **params):
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]


@pytest.fixture(scope="session")
def prometheus(moat):
    binary = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not binary:
        pytest.fail("the prometheus binary is missing: apt-get install prometheus (scripts/test.sh does)")
    work = tempfile.mkdtemp(prefix="moat-prom-")
    key_file = os.path.join(work, "moat.key")
    with open(key_file, "w") as f:
        f.write(moat.api_key)
    os.chmod(key_file, 0o600)
    target = urllib.parse.urlparse(moat.metrics_url).netloc
    config = os.path.join(work, "prometheus.yml")
    # JSON is YAML: no YAML library needed to write the config.
    with open(config, "w") as f:
        json.dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [os.path.join(REPO, "deploy", "prometheus", "alerts.yml")],
            "scrape_configs": [{
                "job_name": "moat",
                "scrape_interval": "1s",
                "static_configs": [{"targets": [target]}],
                "authorization": {"type": "Bearer", "credentials_file": key_file},
            }],
        }, f)
    port = free_port()
    log_path = os.path.join(work, "prometheus.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("prometheus did not become ready:\n" + prom.log())
        time.sleep(0.2)
    try:
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
