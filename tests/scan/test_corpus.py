"""`moat scan` against the generated corpus: every malicious case flagged,
every benign case clean.

The corpus is rebuilt for each run by corpus.py (nothing downloaded). A case
is flagged when any of its files is `unsafe` or `error` (the scanner fails
closed); a benign case must be `clean` in every file.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import corpus  # noqa: E402

from moat_bin import moat_binary  # noqa: E402




@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = corpus.build(str(root))
    os.remove(root / "expected.json")
    proc = subprocess.run(
        [moat_binary(), "scan", "--format", "json", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, f"a corpus with malicious files must exit 1, got {proc.returncode}: {proc.stderr}"
    report = json.loads(proc.stdout)
    by_case: dict[str, list[dict]] = {}
    for f in report["files"]:
        by_case.setdefault(f["path"].split("/", 1)[0], []).append(f)
    return expected, by_case, report


def describe(files: list[dict]) -> str:
    lines = []
    for f in files:
        rules = ", ".join(sorted({x["rule"] for x in f["findings"]})) or "-"
        lines.append(f"    {f['path']} [{f['format']}] {f['verdict']}: {rules}")
    return "\n".join(lines)


def test_corpus_size_meets_the_bar(scanned):
    expected, _, _ = scanned
    malicious = [k for k, v in expected.items() if v["malicious"]]
    benign = [k for k, v in expected.items() if not v["malicious"]]
    assert len(malicious) >= 40 and len(benign) >= 20
    classes = {v["class"] for v in expected.values() if v["malicious"]}
    assert {"pickle", "container", "gguf", "safetensors", "hf", "keras", "onnx", "secrets"} <= classes


def test_every_malicious_case_is_flagged(scanned):
    expected, by_case, _ = scanned
    missed = []
    for name, meta in expected.items():
        if not meta["malicious"]:
            continue
        files = by_case.get(name, [])
        if not any(f["verdict"] in ("unsafe", "error") for f in files):
            missed.append(f"  {name} ({meta['technique']}):\n{describe(files)}")
    assert not missed, "malicious cases passed as clean:\n" + "\n".join(missed)


def test_every_benign_case_is_clean(scanned):
    expected, by_case, _ = scanned
    wrong = []
    for name, meta in expected.items():
        if meta["malicious"]:
            continue
        files = by_case.get(name, [])
        assert files, f"benign case {name} produced no report"
        if any(f["verdict"] != "clean" for f in files):
            wrong.append(f"  {name} ({meta['technique']}):\n{describe(files)}")
    assert not wrong, "benign cases flagged (false positives):\n" + "\n".join(wrong)


def test_findings_carry_rule_severity_and_message(scanned):
    _, _, report = scanned
    for f in report["files"]:
        for x in f["findings"]:
            assert x["rule"] and "." in x["rule"], x
            assert x["severity"] in ("low", "medium", "high", "critical"), x
            assert len(x["message"]) > 20, x
    assert report["summary"]["files"] == len(report["files"])
