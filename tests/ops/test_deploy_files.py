"""Static checks of the container assets (no Docker daemon here): the
compose file wires files that exist and runs moat non-root on a read-only
root filesystem with secrets as files; the Dockerfile is multi-stage,
non-root, has a HEALTHCHECK and puts nothing secret in ENV or ARG; and the
config baked into the image and the chart's default config pass the real
`moat serve --check`."""

import os
import re
import subprocess
import tempfile

import yaml

from moat_bin import REPO, moat_binary

DEPLOY = os.path.join(REPO, "deploy")
SECRETISH = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL)", re.I)


def test_compose_wiring():
    with open(os.path.join(DEPLOY, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    assert {"moat", "redis", "minio", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert os.path.exists(os.path.join(DEPLOY, src)), f"{name}: {src} does not exist"
        for key, value in (svc.get("environment") or {}).items():
            # Only pointers to secret files may look like secrets.
            if SECRETISH.search(key):
                assert key.endswith("_FILE") or key.endswith("__FILE"), f"{name}: {key} holds a secret in env"
                assert str(value).startswith("/run/secrets/"), f"{name}: {key}={value}"
    moat = services["moat"]
    assert re.fullmatch(r"\d+:\d+", moat["user"]) and not moat["user"].startswith("0:")
    assert moat["read_only"] is True and moat["cap_drop"] == ["ALL"]
    assert all(p.startswith("127.0.0.1:") for p in moat["ports"])
    used = {s if isinstance(s, str) else s["source"] for svc in services.values() for s in svc.get("secrets", [])}
    assert used <= set(compose["secrets"])
    # Prometheus in compose loads the shipped rules where prometheus.yml expects them.
    prom = services["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/moat-alerts.yml:ro" in prom


def test_dockerfile():
    with open(os.path.join(REPO, "Dockerfile")) as f:
        text = f.read()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage"
    assert "slim" in froms[-1] or "distroless" in froms[-1], froms[-1]
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    for line in re.findall(r"^(?:ENV|ARG) .*", text, re.M):
        assert not SECRETISH.search(line), line
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignored = f.read()
    assert "target/" in ignored and ".git/" in ignored


def check_config(text):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "moat.toml")
        with open(path, "w") as f:
            f.write(text)
        r = subprocess.run([moat_binary(), "serve", "--config", path, "--check"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr


def test_shipped_configs_pass_moat_check():
    with open(os.path.join(DEPLOY, "docker", "moat.toml")) as f:
        check_config(f.read())
    with open(os.path.join(DEPLOY, "helm", "moat", "values.yaml")) as f:
        check_config(yaml.safe_load(f)["config"])
