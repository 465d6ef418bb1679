"""Fixtures for the OpenSSF model-signing interoperability tests.

Everything secret is made here, per test session, under pytest's tmp_path:
EC key pairs on the three curves model-signing supports (P-256, P-384,
P-521) and a small PKI (root CA -> intermediate CA -> code-signing leaf, one
chain per curve), generated with `cryptography` (a dependency of
model-signing, so it is in the test venv). No private key is committed.

The peer is the real `model_signing` CLI (PyPI `model-signing`, pinned in
scripts/requirements-test.txt), found next to the running python; moat is
`MOAT_BIN` (default target/debug/moat).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signing_helpers import CMD_TIMEOUT_S, CURVES, KeyPair, Pki, describe, make_keypair, make_pki, moat_binary, run


@pytest.fixture(scope="session")
def moat_bin() -> str:
    return moat_binary()


@pytest.fixture(scope="session")
def ms_cli() -> str:
    cli = Path(sys.executable).parent / "model_signing"
    if not cli.is_file():
        pytest.fail(
            f"{cli} not found: install scripts/requirements-test.txt into this venv "
            "(it pins model-signing)"
        )
    probe = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if probe.returncode != 0:
        pytest.fail(f"`model_signing --help` failed (missing dependency?):\n{probe.stderr}")
    return str(cli)


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict:
    """curve name -> KeyPair (PKCS#8 private PEM, SPKI public PEM)."""
    d = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(d, name, curve) for name, curve in CURVES.items()}


@pytest.fixture(scope="session")
def other_key(tmp_path_factory) -> KeyPair:
    """A P-256 pair that signed nothing (the 'wrong key')."""
    return make_keypair(tmp_path_factory.mktemp("other-key"), "other", ec.SECP256R1)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict:
    """curve name -> Pki (root -> intermediate -> leaf, all on that curve)."""
    d = tmp_path_factory.mktemp("pki")
    return {name: make_pki(d / name, curve) for name, curve in CURVES.items()}


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory) -> Pki:
    """An unrelated P-256 PKI: its root must not validate the main chains."""
    return make_pki(tmp_path_factory.mktemp("foreign-pki"), ec.SECP256R1)


@pytest.fixture(scope="session")
def model_template(tmp_path_factory, moat_bin) -> Path:
    """The tiny demo model (HF layout, ~7 MB) plus a README and two nested
    folders, so that resource names with a '/' are exercised too."""
    d = tmp_path_factory.mktemp("template") / "tiny-model"
    proc = run([moat_bin, "demo-model", d, "--seed", "7"])
    assert proc.returncode == 0, describe(proc)
    (d / "README.md").write_text("# tiny demo model\n")
    (d / "docs").mkdir()
    (d / "docs" / "card.md").write_text("model card, v1\n")
    (d / "docs" / "eval.json").write_text('{"score": 0.5}\n')
    # Next to tokenizer.json: path-component order differs from string order.
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>"}\n')
    # An empty file: one resource with the files method, none with shards.
    (d / "tokenizer" / "empty.txt").write_bytes(b"")
    return d


@pytest.fixture
def model(tmp_path, model_template) -> Path:
    """A fresh copy of the template, named `tiny-model`, for one test."""
    dst = tmp_path / "models" / model_template.name
    shutil.copytree(model_template, dst)
    return dst
