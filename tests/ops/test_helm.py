"""The Helm chart (deploy/helm/moat) renders without a Helm binary (with
tests/ops/gotemplate.py, the small renderer for the subset the chart uses)
and every rendered manifest validates, strictly (unknown fields refused),
against the Kubernetes 1.31 JSON schemas shipped by `kubernetes-validate`.
Then the properties the chart promises are checked on the rendered objects:
probes, security context, secrets as files only, no service-account token,
one Service per plane, HPA on CPU and queue depth, PDB, and a NetworkPolicy
that admits the management plane only from the labelled admin namespace."""

import copy
import os

import kubernetes_validate
import pytest
import yaml

from moat_bin import REPO
from gotemplate import TemplateError, render

CHART = os.path.join(REPO, "deploy", "helm", "moat")
K8S_VERSION = "1.31.0"


def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render_chart(overrides=None):
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = merge(yaml.safe_load(f), overrides or {})
    ctx = {
        "Values": values,
        "Release": {"Name": "moat", "Namespace": "ai"},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
    }
    docs = []
    tdir = os.path.join(CHART, "templates")
    for name in sorted(os.listdir(tdir)):
        with open(os.path.join(tdir, name)) as f:
            text = render(f.read(), ctx, name)
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def by_kind(docs):
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


VARIANTS = {
    "defaults": {},
    "management, fixed replicas, shared store": {
        "management": {"enabled": True},
        "autoscaling": {"enabled": False},
        "store": {"existingClaim": "moat-store"},
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_validate_against_kubernetes_schemas(variant):
    docs = render_chart(VARIANTS[variant])
    assert len(docs) >= 6
    for d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} ({variant}): {e.message} at {list(e.path)}")


def test_chart_properties():
    k = by_kind(render_chart())
    (dep,) = k["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert "replicas" not in dep["spec"], "the HPA owns replicas"
    assert pod["automountServiceAccountToken"] is False
    assert k["ServiceAccount"][0]["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    # Secrets and config are files; nothing in env, nothing secret in argv.
    assert "env" not in c and "envFrom" not in c
    assert all("key" not in a.lower() for a in c["args"]), c["args"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["keys"]["secret"]["defaultMode"] == 0o400
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["keys"]["readOnly"] and mounts["config"]["readOnly"]
    config = k["ConfigMap"][0]["data"]["moat.toml"]
    assert 'keys_file = "/etc/moat/secrets/keys.json"' in config
    assert 'listen = "0.0.0.0:8080"' in config
    # One Service per plane (management only when enabled).
    planes = {s["metadata"]["labels"]["moat.dev/plane"] for s in k["Service"]}
    assert planes == {"inference", "metrics"}
    # HPA on CPU and on queue depth per pod.
    (hpa,) = k["HorizontalPodAutoscaler"]
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "moat_engine_queue_depth"
    assert k["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1


def test_management_plane_only_from_admin_namespace():
    k = by_kind(render_chart({"management": {"enabled": True},
                              "networkPolicy": {"adminNamespaceLabel": "corp/admins"}}))
    planes = {s["metadata"]["labels"]["moat.dev/plane"] for s in k["Service"]}
    assert planes == {"inference", "metrics", "management"}
    (np,) = k["NetworkPolicy"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    rules = np["spec"]["ingress"]
    to_mgmt = [r for r in rules if any(p["port"] == 8081 for p in r.get("ports", []))]
    assert len(to_mgmt) == 1
    (peer,) = to_mgmt[0]["from"]
    assert set(peer) == {"namespaceSelector"}, "no pod- or IP-based way in"
    assert peer["namespaceSelector"]["matchExpressions"] == [{"key": "corp/admins", "operator": "Exists"}]
    # The port is not open through any other rule.
    assert all("from" in r for r in to_mgmt)
    assert not any(8081 == p["port"] for r in rules if r is not to_mgmt[0] for p in r.get("ports", []))
    # Without the management plane, its port is in no rule at all.
    (np,) = by_kind(render_chart())["NetworkPolicy"]
    assert not any(p["port"] == 8081 for r in np["spec"]["ingress"] for p in r.get("ports", []))


def test_renderer_refuses_what_it_does_not_support():
    ctx = {"Values": {"a": {"b": 1}}, "Release": {}, "Chart": {}}
    assert render("x: {{ .Values.a.b }}", ctx) == "x: 1"
    assert render("{{- if .Values.a }}\nyes\n{{- else }}\nno\n{{- end }}", ctx) == "\nyes"
    for bad in ("{{ .Values.missing }}", "{{ include \"x\" . }}", "{{ if .Values.a }}open",
                "{{ .Values.a | upper }}", "{{ .Values.a }}"):
        with pytest.raises(TemplateError):
            render(bad, ctx, "t.yaml")
