"""`moat scan --format sarif` output is valid against the official SARIF
2.1.0 schema (tests/fixtures/sarif-schema-2.1.0.json, see the README there),
for clean, unsafe and unreadable files, and keeps the exit codes 0/1/2."""

import json
import os
import struct
import subprocess

import jsonschema
import pytest

from moat_bin import moat_binary  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = os.path.join(REPO, "tests", "fixtures", "sarif-schema-2.1.0.json")




@pytest.fixture(scope="module")
def validator():
    with open(SCHEMA, encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def scan(*paths):
    proc = subprocess.run(
        [moat_binary(), "scan", "--format", "sarif", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, json.loads(proc.stdout)


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def write_model(d):
    (d / "config.json").write_text('{"model_type": "qwen2"}')
    (d / "README.md").write_text("# a model\n")
    # A GGUF with no tensors and a benign chat template.
    template = b"{% for m in messages %}{{ m['content'] }}{% endfor %}"
    gguf = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    gguf += gguf_string(b"tokenizer.chat_template") + struct.pack("<I", 8) + gguf_string(template)
    (d / "model.gguf").write_bytes(gguf)


def test_clean_folder(tmp_path, validator):
    write_model(tmp_path)
    code, log = scan(tmp_path)
    validator.validate(log)
    assert code == 0
    assert log["runs"][0]["results"] == []
    assert log["runs"][0]["invocations"][0]["executionSuccessful"] is True


def test_unsafe_findings(tmp_path, validator):
    write_model(tmp_path)
    token = "hf_" + "Ab1" * 12
    (tmp_path / "notes.txt").write_text(f"token {token}\n")
    (tmp_path / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.popen('id').read() }}")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "remote.py").write_text("import os\n")
    code, log = scan(tmp_path)
    validator.validate(log)
    assert code == 1
    run = log["runs"][0]
    rule_ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    results = run["results"]
    for r in results:
        assert rule_ids[r["ruleIndex"]] == r["ruleId"]
    by_rule = {r["ruleId"]: r for r in results}
    assert "secrets.huggingface-token" in by_rule
    assert token not in json.dumps(log)
    assert by_rule["gguf.truncated"]["locations"][0]["physicalLocation"]["region"]["byteOffset"] == 8
    assert by_rule["gguf.truncated"]["level"] == "error"
    assert "template.dunder" in by_rule


def test_unreadable_file_is_an_unsuccessful_execution(tmp_path, validator):
    write_model(tmp_path)
    missing = tmp_path / "does-not-exist.bin"
    code, log = scan(tmp_path / "config.json", missing)
    validator.validate(log)
    assert code == 2
    invocation = log["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False
    assert len(invocation["toolExecutionNotifications"]) == 1


def test_validator_rejects_a_broken_log(validator):
    # The schema is really applied: a result without a message is invalid.
    broken = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "moat"}}, "results": [{"ruleId": "x"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)
