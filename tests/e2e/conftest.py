"""Fixtures for moat's end-to-end tests.

One `moat serve --demo` process per test session, on ephemeral ports. Its
stdout is drained by a background thread (so the pipe never fills) into a
list the tests can inspect: the `export` lines first, then one JSON request
record per request.
"""

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from moat_bin import moat_binary  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 60.0




@dataclass
class DemoServer:
    proc: subprocess.Popen
    base_url: str
    api_key: str
    metrics_url: str
    binary: str
    home: str
    lines: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stdout_lines(self) -> list:
        with self.lock:
            return list(self.lines)

    def records(self) -> list:
        """The JSON request records printed so far."""
        out = []
        for line in self.stdout_lines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def wait_for_record(self, predicate, timeout: float = 10.0):
        """Poll the request records until one matches (streams are recorded
        when they end, slightly after the client saw [DONE])."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.records():
                if predicate(rec):
                    return rec
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)


def _drain(stream, lines, lock, first_lines_ready, stderr_tail):
    for raw in iter(stream.readline, ""):
        with lock:
            lines.append(raw.rstrip("\n"))
        if raw.startswith("# metrics:"):
            first_lines_ready.set()
    first_lines_ready.set()


def _drain_stderr(stream, tail):
    for raw in iter(stream.readline, ""):
        tail.append(raw)
        if len(tail) > 200:
            del tail[:100]


@pytest.fixture(scope="session")
def moat_server():
    binary = moat_binary()
    env = dict(os.environ)
    env.setdefault("NO_COLOR", "1")
    proc = subprocess.Popen(
        [
            binary,
            "serve",
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
    )
    lines: list = []
    lock = threading.Lock()
    ready = threading.Event()
    stderr_tail: list = []
    t_out = threading.Thread(
        target=_drain, args=(proc.stdout, lines, lock, ready, stderr_tail), daemon=True
    )
    t_err = threading.Thread(target=_drain_stderr, args=(proc.stderr, stderr_tail), daemon=True)
    t_out.start()
    t_err.start()

    def fail_startup(why: str):
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        t_err.join(timeout=2)
        with lock:
            out = "\n".join(lines)
        pytest.fail(
            f"moat serve --demo did not start: {why}\n"
            f"exit code: {proc.returncode}\nstdout:\n{out}\nstderr tail:\n{''.join(stderr_tail[-40:])}"
        )

    if not ready.wait(STARTUP_TIMEOUT_S):
        fail_startup(f"no `# metrics:` line on stdout within {STARTUP_TIMEOUT_S:.0f} s")

    base_url = api_key = metrics_url = home = None
    with lock:
        for line in lines:
            if line.startswith("# moat demo:") and " into " in line:
                home = line.rsplit(" into ", 1)[1].strip()
            elif line.startswith("export OPENAI_BASE_URL="):
                base_url = line.split("=", 1)[1].strip()
            elif line.startswith("export OPENAI_API_KEY="):
                api_key = line.split("=", 1)[1].strip()
            elif line.startswith("# metrics:"):
                parts = line.split()
                metrics_url = next((p for p in parts if p.startswith("http")), None)
    if not (base_url and api_key and metrics_url and home):
        fail_startup("the export/metrics lines were missing or malformed")
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1"), base_url
    assert api_key.startswith("moat_"), "the minted key should look like moat_<id>_<secret>"
    assert metrics_url.startswith("http://127.0.0.1:") and metrics_url.endswith("/metrics"), metrics_url

    assert os.path.isfile(os.path.join(home, "keys.json")), f"demo store {home} has no keys.json"

    server = DemoServer(proc=proc, base_url=base_url, api_key=api_key, metrics_url=metrics_url,
                        binary=binary, home=home, lines=lines, lock=lock)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                pytest.fail("moat did not exit within 20 s of SIGTERM")
        else:
            code = proc.returncode
        t_out.join(timeout=5)
        t_err.join(timeout=5)
        assert code == 0, (
            f"moat should exit 0 on SIGTERM, got {code}; stderr tail:\n{''.join(stderr_tail[-40:])}"
        )
        demo_dir = os.path.dirname(home.rstrip("/"))
        assert not os.path.exists(demo_dir), f"the demo should delete its folder {demo_dir} on exit"


@pytest.fixture(scope="session")
def client(moat_server):
    import openai

    return openai.OpenAI(base_url=moat_server.base_url, api_key=moat_server.api_key,
                         max_retries=0, timeout=60)
