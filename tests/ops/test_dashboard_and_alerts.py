"""The Grafana dashboard and the alert rules only use metrics the real
server exposes, and the documented metrics table matches a real scrape:
names are compared against `/metrics` of a running `moat serve --demo`
(GPU series, absent without the `nvml` feature and a GPU, are checked
against the docs table instead), and every dashboard query is run through a
real Prometheus to prove it parses."""

import json
import os
import re

import yaml

from moat_bin import REPO

NAME = re.compile(r"\b((?:moat|process)_[a-zA-Z0-9_]+)\b")


def scraped_names(text):
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def documented():
    """(name, row) for each row of the Metrics table in docs/operations.md."""
    with open(os.path.join(REPO, "docs", "operations.md")) as f:
        text = f.read()
    out = []
    for row in text.splitlines():
        m = re.match(r"^\| `((?:moat|process)_[a-z0-9_]+)`", row)
        if m:
            out.append((m.group(1), row))
    return out


def gpu_names():
    return {n for n, row in documented() if "nvml" in row.lower()}


def dashboard_exprs():
    with open(os.path.join(REPO, "deploy", "grafana", "moat.json")) as f:
        dash = json.load(f)
    exprs = []
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            exprs.append((p["title"], t["expr"]))
    return dash, exprs


def alert_exprs():
    with open(os.path.join(REPO, "deploy", "prometheus", "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def traffic(moat):
    """A success and a refusal, so per-model and rejection series exist
    (a labelled family has no series before its first observation)."""
    body = {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert moat.request("POST", "/v1/chat/completions", body)[0] == 200
    assert moat.request("POST", "/v1/chat/completions", body, key=None)[0] == 401


def test_dashboard_and_alerts_use_real_metrics(moat, prometheus):
    traffic(moat)
    exposed = scraped_names(moat.scrape())
    allowed = exposed | gpu_names()
    dash, exprs = dashboard_exprs()
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "model"}
    for source, items in (("dashboard", exprs), ("alerts.yml", alert_exprs())):
        for title, expr in items:
            names = set(NAME.findall(expr))
            if re.fullmatch(r"vector\([0-9.]+\)", expr) or expr.startswith("up{"):
                continue  # a constant line (the SLO), or Prometheus's own `up`
            assert names, f"{source} {title!r}: no moat metric in {expr}"
            unknown = names - allowed
            assert not unknown, f"{source} {title!r} uses metrics the server does not expose: {unknown}"
    # Every dashboard query parses and runs in a real Prometheus.
    for title, expr in exprs:
        q = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$job", "moat")
        prometheus.query(q)


def test_docs_table_matches_a_real_scrape(moat):
    traffic(moat)
    exposed = scraped_names(moat.scrape())
    docs = documented()
    assert len(docs) >= 20, docs
    gpu = gpu_names()
    assert gpu, "the GPU metrics (nvml feature) must be documented"
    # Upstream-pool metrics exist only with an upstream-served model, which
    # `serve --demo` has not: tests/e2e/test_upstream.py checks those.
    missing = [n for n, _ in docs if n not in gpu and n not in exposed and not n.startswith("moat_upstream_")]
    assert not missing, f"documented but not exposed: {missing}"
    base = {n for n, _ in docs}
    undocumented = sorted(
        n for n in exposed
        if n.startswith(("moat_", "process_"))
        and n not in base
        and n + "_total" not in base  # a counter's TYPE line has no _total
        and re.sub(r"_(bucket|sum|count|created|total)$", "", n) not in base
    )
    assert not undocumented, f"exposed but not in docs/operations.md: {undocumented}"
