"""Interoperability of `moat sign` / `moat verify-signature` with the
reference OpenSSF model-signing tool (`model_signing`, PyPI model-signing).

Both directions, for every method both tools have: `key` (P-256, P-384,
P-521), `certificate` (root -> intermediate -> code-signing leaf), file
shards, ignore paths and symlinks; then tampered models, where moat must
answer exit 1 with a precise reason and the reference tool must agree.

Notes on the reference tool (model_signing 1.1.1), which these tests mirror:
- its CLI has no shard option and its `verify` always re-hashes with
  whole-file serialization, so shard signatures go through its Python API;
  there the shard size must be given explicitly, because the tool writes it
  as a JSON float (`"shard_size": 1000000.0`) that its own guessing code
  cannot use (moat must read it as an integer);
- `--ignore-paths` and `--signature` are resolved against the current
  directory: the tests pass absolute paths;
- the model name (the subject name, i.e. the folder name at signing time) is
  informative only: a signature made on a copy of the folder under another
  name verifies the original;
- its `sign certificate` fails without `--certificate_chain` (it parses the
  empty chain as PEM), so leaf-only bundles are made by moat here;
- model-signing 1.1.1 imports pyOpenSSL without declaring it: the
  requirements file installs it.

Runtime: ~20 s (debug moat, 2 cores).
"""

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from signing_helpers import CURVES, describe, run

INVALID_PREFIX = "moat: signature invalid:"


# --------------------------------------------------------------------------
# command helpers (moat spells flags with dashes, model_signing with
# underscores, except --ignore-paths)


def moat_sign_key(moat, model, key, sig=None, extra=()):
    args = [moat, "sign", "key", model, "--private-key", key]
    if sig is not None:
        args += ["--signature", sig]
    return run(args + list(extra))


def moat_verify_key(moat, model, sig, pub, extra=()):
    return run([moat, "verify-signature", "key", model, "--signature", sig, "--public-key", pub, *extra])


def moat_sign_cert(moat, model, pki, sig=None, extra=()):
    args = [moat, "sign", "certificate", model, "--private-key", pki.leaf_key,
            "--signing-certificate", pki.leaf, "--certificate-chain", pki.intermediate]
    if sig is not None:
        args += ["--signature", sig]
    return run(args + list(extra))


def moat_verify_cert(moat, model, sig, root, extra=()):
    return run([moat, "verify-signature", "certificate", model, "--signature", sig,
                "--certificate-chain", root, *extra])


def ms_sign_key(ms, model, key, sig, extra=()):
    return run([ms, "sign", "key", model, "--private_key", key, "--signature", sig, *extra])


def ms_verify_key(ms, model, sig, pub, extra=()):
    return run([ms, "verify", "key", model, "--signature", sig, "--public_key", pub, *extra])


def ms_sign_cert(ms, model, pki, sig, extra=(), leaf=None, leaf_key=None):
    return run([ms, "sign", "certificate", model, "--private_key", leaf_key or pki.leaf_key,
                "--signing_certificate", leaf or pki.leaf, "--certificate_chain", pki.intermediate,
                "--signature", sig, *extra])


def ms_verify_cert(ms, model, sig, root, extra=()):
    return run([ms, "verify", "certificate", model, "--signature", sig, "--certificate_chain", root, *extra])


def assert_ok(proc, what=""):
    assert proc.returncode == 0, f"{what}\n{describe(proc)}"


def assert_tool_rejects(proc):
    assert proc.returncode == 1 and "Verification failed" in proc.stderr, (
        "model_signing should reject this too\n" + describe(proc)
    )


def moat_reason(proc) -> str:
    """The reason moat gives for an invalid signature (exit 1)."""
    assert proc.returncode == 1, f"moat should answer exit 1 (signature invalid)\n{describe(proc)}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith(INVALID_PREFIX)]
    assert lines, f"no `{INVALID_PREFIX} <reason>` line on stderr\n{describe(proc)}"
    reason = lines[0][len(INVALID_PREFIX):].strip()
    assert reason, f"empty reason\n{describe(proc)}"
    return reason


def payload_of(sig: Path) -> dict:
    bundle = json.loads(Path(sig).read_text())
    envelope = bundle["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    return json.loads(base64.b64decode(envelope["payload"]))


def resource_names(sig: Path) -> list:
    return sorted(r["name"] for r in payload_of(sig)["predicate"]["resources"])


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------
# key: both directions, each curve


@pytest.mark.parametrize("curve", list(CURVES))
def test_key_signed_by_model_signing_verifies_with_moat(moat_bin, ms_cli, keys, model, curve):
    # The signature lies inside the model folder, where the tool puts it by
    # default: it records `model.sig` among the ignored paths, and moat must
    # not count it as an extra file.
    sig = model / "model.sig"
    assert_ok(ms_sign_key(ms_cli, model, keys[curve].private, sig))
    assert_ok(moat_verify_key(moat_bin, model, sig, keys[curve].public), "moat verify-signature key")


@pytest.mark.parametrize("curve", list(CURVES))
def test_key_signed_by_moat_verifies_with_model_signing(moat_bin, ms_cli, keys, model, curve):
    # No --signature: moat's default is MODEL_DIR/model.sig.
    assert_ok(moat_sign_key(moat_bin, model, keys[curve].private), "moat sign key")
    sig = model / "model.sig"
    assert sig.is_file(), "moat sign key should write MODEL_DIR/model.sig by default"
    bundle = json.loads(sig.read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert len(bundle["dsseEnvelope"]["signatures"]) == 1
    payload = payload_of(sig)
    assert payload["_type"] == "https://in-toto.io/Statement/v1"
    assert payload["predicateType"] == "https://model_signing/signature/v1.0"
    assert payload["subject"][0]["name"] == model.name
    assert payload["predicate"]["serialization"]["method"] == "files"
    assert resource_names(sig) == sorted(
        ["README.md", "config.json", "docs/card.md", "docs/eval.json", "generation_config.json",
         "model.safetensors", "tokenizer.json", "tokenizer/empty.txt",
         "tokenizer/special_tokens_map.json", "tokenizer_config.json"]
    )
    assert_ok(ms_verify_key(ms_cli, model, sig, keys[curve].public), "model_signing verify key")
    # And moat reads its own signature back.
    assert_ok(moat_verify_key(moat_bin, model, sig, keys[curve].public), "moat verify-signature key")


def test_key_same_manifest_both_tools(moat_bin, ms_cli, keys, model, tmp_path):
    """Same folder, same key: both tools list the same resources with the same
    digests and the same root digest (ECDSA signatures differ, of course)."""
    a, b = tmp_path / "moat.sig", tmp_path / "ms.sig"
    assert_ok(moat_sign_key(moat_bin, model, keys["p256"].private, a))
    assert_ok(ms_sign_key(ms_cli, model, keys["p256"].private, b))
    pa, pb = payload_of(a), payload_of(b)
    key = lambda r: r["name"]  # noqa: E731
    assert sorted(pa["predicate"]["resources"], key=key) == sorted(pb["predicate"]["resources"], key=key)
    # Canonical order is by path components, as Python sorts PurePath:
    # `tokenizer/special_tokens_map.json` < `tokenizer.json` < `tokenizer_config.json`
    # (plain string order would put `tokenizer.json` first). The root digest
    # in the subject is taken over the digests in that order.
    assert [r["name"] for r in pa["predicate"]["resources"]] == [r["name"] for r in pb["predicate"]["resources"]]
    assert pa["subject"] == pb["subject"]
    sa, sb = pa["predicate"]["serialization"], pb["predicate"]["serialization"]
    assert (sa["method"], sa["hash_type"], sa["allow_symlinks"]) == (sb["method"], sb["hash_type"], sb["allow_symlinks"])
    bundle = json.loads(a.read_text())
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == json.loads(b.read_text())[
        "verificationMaterial"]["publicKey"]["hint"], "the public-key hint (SHA-256 of the SPKI PEM) must match"


# --------------------------------------------------------------------------
# certificate: both directions


CERT_CURVES = ["p256", "p384"]


@pytest.mark.parametrize("curve", CERT_CURVES)
def test_certificate_signed_by_model_signing_verifies_with_moat(moat_bin, ms_cli, pki, model, tmp_path, curve):
    sig = tmp_path / "model.sig"
    assert_ok(ms_sign_cert(ms_cli, model, pki[curve], sig))
    chain = json.loads(sig.read_text())["verificationMaterial"]["x509CertificateChain"]["certificates"]
    assert len(chain) == 2, "the bundle carries the leaf and the intermediate"
    assert_ok(moat_verify_cert(moat_bin, model, sig, pki[curve].root), "moat verify-signature certificate")


@pytest.mark.parametrize("curve", CERT_CURVES)
def test_certificate_signed_by_moat_verifies_with_model_signing(moat_bin, ms_cli, pki, model, tmp_path, curve):
    sig = tmp_path / "model.sig"
    assert_ok(moat_sign_cert(moat_bin, model, pki[curve], sig), "moat sign certificate")
    material = json.loads(sig.read_text())["verificationMaterial"]
    assert "x509CertificateChain" in material, material
    assert len(material["x509CertificateChain"]["certificates"]) == 2, "leaf + intermediate"
    assert_ok(ms_verify_cert(ms_cli, model, sig, pki[curve].root), "model_signing verify certificate")
    assert_ok(moat_verify_cert(moat_bin, model, sig, pki[curve].root), "moat verify-signature certificate")


def test_certificate_untrusted_root_rejected_by_both(moat_bin, ms_cli, pki, foreign_pki, model, tmp_path):
    sig = tmp_path / "model.sig"
    assert_ok(ms_sign_cert(ms_cli, model, pki["p256"], sig))
    reason = moat_reason(moat_verify_cert(moat_bin, model, sig, foreign_pki.root))
    assert any(w in reason.lower() for w in ("certificate", "chain", "trust", "issuer")), reason
    assert_tool_rejects(ms_verify_cert(ms_cli, model, sig, foreign_pki.root))


def test_certificate_not_for_signing_rejected_by_both(moat_bin, ms_cli, pki, model, tmp_path):
    """A leaf from the trusted chain, but a TLS-server one (no digitalSignature
    key usage, no codeSigning EKU): the tool refuses it after the chain check."""
    p = pki["p256"]
    sig = tmp_path / "model.sig"
    assert_ok(ms_sign_cert(ms_cli, model, p, sig, leaf=p.bad_leaf, leaf_key=p.bad_leaf_key))
    assert_tool_rejects(ms_verify_cert(ms_cli, model, sig, p.root))
    reason = moat_reason(moat_verify_cert(moat_bin, model, sig, p.root))
    assert any(w in reason.lower() for w in ("usage", "signing", "code")), reason


def test_certificate_leaf_only_bundle(moat_bin, ms_cli, pki, model, tmp_path):
    """moat signs with no --certificate-chain (the bundle carries the leaf
    alone; the tool's own `sign certificate` cannot: it fails on the empty
    chain). Trusting root + intermediate, both accept it, given as one file
    or as two; trusting the root alone, both refuse (no issuer for the leaf)."""
    p = pki["p521"]
    sig = tmp_path / "model.sig"
    assert_ok(run([moat_bin, "sign", "certificate", model, "--private-key", p.leaf_key,
                   "--signing-certificate", p.leaf, "--signature", sig]), "moat sign certificate, no chain")
    assert len(json.loads(sig.read_text())["verificationMaterial"]["x509CertificateChain"]["certificates"]) == 1
    both = tmp_path / "root-and-intermediate.pem"
    both.write_bytes(p.root.read_bytes() + p.intermediate.read_bytes())
    assert_ok(ms_verify_cert(ms_cli, model, sig, both))
    assert_ok(moat_verify_cert(moat_bin, model, sig, both))
    assert_ok(moat_verify_cert(moat_bin, model, sig, p.root, ["--certificate-chain", p.intermediate]))
    assert_tool_rejects(ms_verify_cert(ms_cli, model, sig, p.root))
    reason = moat_reason(moat_verify_cert(moat_bin, model, sig, p.root))
    assert "issuer" in reason.lower() or "chain" in reason.lower(), reason


# --------------------------------------------------------------------------
# a model that is a single file


def test_single_file_model_both_directions(moat_bin, ms_cli, keys, model, tmp_path):
    f = model / "model.safetensors"
    a, b = tmp_path / "moat.sig", tmp_path / "ms.sig"
    assert_ok(moat_sign_key(moat_bin, f, keys["p384"].private, a))
    assert_ok(ms_sign_key(ms_cli, f, keys["p384"].private, b))
    assert payload_of(a)["predicate"]["resources"] == payload_of(b)["predicate"]["resources"]
    assert payload_of(a)["subject"] == payload_of(b)["subject"]
    assert_ok(ms_verify_key(ms_cli, f, a, keys["p384"].public))
    assert_ok(moat_verify_key(moat_bin, f, b, keys["p384"].public))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    assert_tool_rejects(ms_verify_key(ms_cli, f, a, keys["p384"].public))
    moat_reason(moat_verify_key(moat_bin, f, b, keys["p384"].public))


# --------------------------------------------------------------------------
# shards (the tool's CLI has no shard option: its Python API does it)


def test_shards_signed_by_model_signing_verify_with_moat(moat_bin, keys, model, tmp_path):
    import model_signing

    sig = tmp_path / "model.sig"
    shard = 1_000_000  # 7 MB safetensors -> 8 shards; the default would be 1 GB
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys["p384"].private).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization(shard_size=shard)
    ).sign(model, sig)
    ser = payload_of(sig)["predicate"]["serialization"]
    # The tool writes the shard size as a JSON float (protobuf Struct):
    # moat must read `1000000.0` as 1000000.
    assert ser["method"] == "shards" and ser["shard_size"] == shard, ser
    assert isinstance(ser["shard_size"], float), "precondition: the tool writes a float"
    names = resource_names(sig)
    size = (model / "model.safetensors").stat().st_size
    assert f"model.safetensors:0:{shard}" in names and f"model.safetensors:{size // shard * shard}:{size}" in names
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p384"].public), "moat verify-signature key (shards)")

    # One flipped byte in the 4th shard: moat names the file.
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[3 * shard + 17] ^= 0x01
    f.write_bytes(bytes(data))
    reason = moat_reason(moat_verify_key(moat_bin, model, sig, keys["p384"].public))
    assert "model.safetensors" in reason, reason
    with pytest.raises(ValueError, match="model.safetensors"):
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["p384"].public).set_hashing_config(
            model_signing.hashing.Config().use_shard_serialization(shard_size=shard)
        ).verify(model, sig)


def test_shards_signed_by_moat_verify_with_model_signing(moat_bin, keys, model, tmp_path):
    import model_signing

    sig = tmp_path / "model.sig"
    assert_ok(moat_sign_key(moat_bin, model, keys["p256"].private, sig, ["--use-shards"]), "moat sign key --use-shards")
    ser = payload_of(sig)["predicate"]["serialization"]
    assert ser["method"] == "shards" and ser["hash_type"] == "sha256", ser
    shard = ser["shard_size"]
    assert isinstance(shard, (int, float)) and shard == int(shard) and shard > 0, ser
    shard = int(shard)
    size = (model / "model.safetensors").stat().st_size
    assert f"model.safetensors:0:{min(size, shard)}" in resource_names(sig)
    assert not [n for n in resource_names(sig) if n.startswith("tokenizer/empty.txt")], "an empty file has no shard"
    # The shard size must be given: the tool's own guess from the signature
    # breaks on the float it writes itself (1.1.1: `"shard_size": 1000000.0`,
    # then range() gets a float). Ignore paths still come from the signature.
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["p256"].public).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization(shard_size=shard)
    ).verify(model, sig)
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p256"].public), "moat verify-signature key (shards)")


def test_shards_small_same_manifest_both_tools(moat_bin, keys, model, tmp_path):
    """700 kB shards: 11 shards of model.safetensors, where numeric order
    (700000 < 7000000, as the tool sorts) and string order differ. Same
    resources, same order, same root digest; and each tool verifies the
    other's signature."""
    import model_signing

    shard = 700_000
    a, b = tmp_path / "moat.sig", tmp_path / "ms.sig"
    assert_ok(moat_sign_key(moat_bin, model, keys["p521"].private, a,
                            ["--use-shards", "--shard-size", shard]), "moat sign key --use-shards --shard-size")
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys["p521"].private).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization(shard_size=shard)
    ).sign(model, b)
    pa, pb = payload_of(a), payload_of(b)
    assert [r["name"] for r in pa["predicate"]["resources"]] == [r["name"] for r in pb["predicate"]["resources"]]
    assert pa["predicate"]["resources"] == pb["predicate"]["resources"]  # name, algorithm, digest
    assert pa["subject"] == pb["subject"]
    assert int(pa["predicate"]["serialization"]["shard_size"]) == shard
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["p521"].public).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization(shard_size=shard)
    ).verify(model, a)
    assert_ok(moat_verify_key(moat_bin, model, b, keys["p521"].public), "moat verifies the tool's 700 kB shards")


# --------------------------------------------------------------------------
# ignore paths: recorded in the signature, honoured by the other side


def _touch_ignored(model: Path):
    (model / "README.md").write_text("# edited after signing\n")
    (model / "docs" / "card.md").write_text("model card, v2\n")
    (model / "docs" / "new.txt").write_text("added after signing\n")


def test_ignore_paths_signed_by_model_signing_verify_with_moat(moat_bin, ms_cli, keys, model, tmp_path):
    sig = tmp_path / "model.sig"
    assert_ok(ms_sign_key(ms_cli, model, keys["p256"].private, sig,
                          ["--ignore-paths", model / "README.md", "--ignore-paths", model / "docs"]))
    assert set(payload_of(sig)["predicate"]["serialization"]["ignore_paths"]) >= {"README.md", "docs"}
    assert "README.md" not in resource_names(sig) and "docs/card.md" not in resource_names(sig)
    _touch_ignored(model)
    # The tool takes the ignore paths from the signature; so must moat.
    assert_ok(ms_verify_key(ms_cli, model, sig, keys["p256"].public), "model_signing verify key")
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p256"].public),
              "moat verify-signature key must honour the ignore_paths recorded in the signature")
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p256"].public,
                              ["--ignore-paths", model / "README.md", "--ignore-paths", model / "docs"]))
    # A file that is not ignored is still covered.
    (model / "config.json").write_text("{}")
    assert "config.json" in moat_reason(moat_verify_key(moat_bin, model, sig, keys["p256"].public))
    assert_tool_rejects(ms_verify_key(ms_cli, model, sig, keys["p256"].public))


def test_ignore_paths_signed_by_moat_verify_with_model_signing(moat_bin, ms_cli, keys, model, tmp_path):
    sig = tmp_path / "model.sig"
    assert_ok(moat_sign_key(moat_bin, model, keys["p256"].private, sig,
                            ["--ignore-paths", model / "README.md", model / "docs"]), "moat sign --ignore-paths")
    ser = payload_of(sig)["predicate"]["serialization"]
    assert {"README.md", "docs"} <= set(ser.get("ignore_paths", [])), ser
    assert not {"README.md", "docs/card.md", "docs/eval.json"} & set(resource_names(sig))
    _touch_ignored(model)
    # No --ignore-paths on the tool's side: it must find them in the signature.
    assert_ok(ms_verify_key(ms_cli, model, sig, keys["p256"].public), "model_signing verify key")
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p256"].public), "moat verify-signature key")


# --------------------------------------------------------------------------
# symlinks, when allowed on both sides


def _add_symlink(model: Path) -> Path:
    link = model / "docs" / "link.json"
    os.symlink("../config.json", link)
    return link


def test_symlinks_allowed_signed_by_model_signing_verify_with_moat(moat_bin, ms_cli, keys, model, tmp_path):
    _add_symlink(model)
    sig = tmp_path / "model.sig"
    assert_ok(ms_sign_key(ms_cli, model, keys["p256"].private, sig, ["--allow_symlinks"]))
    assert "docs/link.json" in resource_names(sig)
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p256"].public, ["--allow-symlinks"]))


def test_symlinks_allowed_signed_by_moat_verify_with_model_signing(moat_bin, ms_cli, keys, model, tmp_path):
    _add_symlink(model)
    sig = tmp_path / "model.sig"
    assert_ok(moat_sign_key(moat_bin, model, keys["p256"].private, sig, ["--allow-symlinks"]))
    names = resource_names(sig)
    assert "docs/link.json" in names, names
    assert payload_of(sig)["predicate"]["serialization"]["allow_symlinks"] is True
    assert_ok(ms_verify_key(ms_cli, model, sig, keys["p256"].public, ["--allow_symlinks"]))


# --------------------------------------------------------------------------
# model name: informative only, as in the reference tool


def test_signature_made_under_another_folder_name(moat_bin, ms_cli, keys, model, tmp_path):
    """The tool signs a copy of the folder named `other-name`, then verifies
    the original `tiny-model` with that signature: it accepts (the subject
    name is informative; only the resources are compared). moat mirrors it."""
    copy = tmp_path / "elsewhere" / "other-name"
    shutil.copytree(model, copy)
    sig = tmp_path / "model.sig"
    assert_ok(ms_sign_key(ms_cli, copy, keys["p256"].private, sig))
    assert payload_of(sig)["subject"][0]["name"] == "other-name"
    assert_ok(ms_verify_key(ms_cli, model, sig, keys["p256"].public), "model_signing accepts a renamed folder")
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p256"].public), "moat should agree with model_signing")
    # moat can ask for the name (the tool cannot): then it is a mismatch.
    reason = moat_reason(moat_verify_key(moat_bin, model, sig, keys["p256"].public, ["--model-name", model.name]))
    assert "other-name" in reason, reason
    # The other way round too.
    sig2 = tmp_path / "moat.sig"
    assert_ok(moat_sign_key(moat_bin, copy, keys["p256"].private, sig2))
    assert payload_of(sig2)["subject"][0]["name"] == "other-name"
    assert_ok(ms_verify_key(ms_cli, model, sig2, keys["p256"].public))


# --------------------------------------------------------------------------
# tampering: moat says exit 1 with a precise reason, the tool agrees


def flip_byte(model, sig, ctx):
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    return ["model.safetensors"]


def rename_file(model, sig, ctx):
    (model / "tokenizer_config.json").rename(model / "tok_cfg.json")
    return ["tokenizer_config.json", "tok_cfg.json"]


def add_file(model, sig, ctx):
    (model / "docs" / "extra.bin").write_bytes(b"\x00" * 16)
    return ["docs/extra.bin"]


def remove_file(model, sig, ctx):
    (model / "generation_config.json").unlink()
    return ["generation_config.json"]


def wrong_key(model, sig, ctx):
    ctx["public"] = ctx["other_key"].public
    return ["key"]


def modified_payload(model, sig, ctx):
    """Change config.json, then make the payload agree with it (its digest and
    the subject's root digest recomputed, the JSON re-encoded), keeping the
    old DSSE signature: only the signature can catch it."""
    cfg = model / "config.json"
    cfg.write_bytes(cfg.read_bytes() + b" ")
    bundle = json.loads(sig.read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    root = hashlib.sha256()
    for r in payload["predicate"]["resources"]:  # already in canonical (sorted) order
        if r["name"] == "config.json":
            r["digest"] = sha256_file(cfg)
        root.update(bytes.fromhex(r["digest"]))
    payload["subject"][0]["digest"]["sha256"] = root.hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    sig.write_text(json.dumps(bundle))
    return []


def symlink_not_allowed(model, sig, ctx):
    os.symlink("config.json", model / "link.json")
    return ["link.json", "symlink"]


TAMPERS = [flip_byte, rename_file, add_file, remove_file, wrong_key, modified_payload, symlink_not_allowed]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_tampered_model_rejected(moat_bin, ms_cli, keys, other_key, model, tmp_path, tamper):
    sig = tmp_path / "model.sig"
    assert_ok(ms_sign_key(ms_cli, model, keys["p256"].private, sig))
    assert_ok(moat_verify_key(moat_bin, model, sig, keys["p256"].public), "before tampering")
    ctx = {"public": keys["p256"].public, "other_key": other_key}
    words = tamper(model, sig, ctx)

    reason = moat_reason(moat_verify_key(moat_bin, model, sig, ctx["public"]))
    for w in words:
        assert w in reason.lower() or w in reason, f"moat's reason should name {w!r}: {reason}"
    if tamper is modified_payload:
        assert any(w in reason.lower() for w in ("signature", "dsse", "ecdsa", "envelope")), reason
        assert "config.json" not in reason, (
            "the DSSE signature must be checked before the manifest is trusted: " + reason
        )
    assert_tool_rejects(ms_verify_key(ms_cli, model, sig, ctx["public"]))
