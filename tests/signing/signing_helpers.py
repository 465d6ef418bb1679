"""Helpers shared by the signing interoperability tests: running the two
tools, and making EC keys and a small PKI with `cryptography`."""

import datetime
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from moat_bin import moat_binary  # noqa: E402,F401  (re-exported to the signing tests)

REPO = Path(__file__).resolve().parents[2]
CURVES = {
    "p256": ec.SECP256R1,
    "p384": ec.SECP384R1,
    "p521": ec.SECP521R1,
}
CMD_TIMEOUT_S = 120




def run(args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("NO_COLOR", "1")
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=CMD_TIMEOUT_S,
        cwd=cwd,
        env=env,
    )


def describe(proc: subprocess.CompletedProcess) -> str:
    return (
        f"$ {' '.join(proc.args)}\nexit {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def write_private(path: Path, key) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def write_public(path: Path, key) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


def make_keypair(d: Path, name: str, curve) -> KeyPair:
    key = ec.generate_private_key(curve())
    return KeyPair(write_private(d / f"{name}.key.pem", key), write_public(d / f"{name}.pub.pem", key))


def _hash_for(key) -> hashes.HashAlgorithm:
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key.curve.key_size]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moat tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(subject_cn, subject_key, issuer_cert, issuer_key, *, ca, path_len=None,
          leaf_usage="code-signing", not_before=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = not_before or now - datetime.timedelta(days=1)
    issuer_name = issuer_cert.subject if issuer_cert is not None else _name(subject_cn)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(issuer_name)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    else:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(subject_key.public_key()), critical=False
        )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    elif leaf_usage == "code-signing":
        # What model_signing's certificate verifier looks for: KeyUsage
        # digitalSignature, or else ExtendedKeyUsage codeSigning. Give both,
        # as a real code-signing certificate would.
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name("model-signer@example.com")]), critical=False
        )
    elif leaf_usage == "tls-server":
        # Valid chain, but not allowed to sign: no digitalSignature, no codeSigning.
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("server.example.com")]), critical=False)
    else:
        raise ValueError(leaf_usage)
    signer_key = issuer_key if issuer_key is not None else subject_key
    return b.sign(signer_key, _hash_for(signer_key))


def _pem(path: Path, *certs) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


@dataclass(frozen=True)
class Pki:
    root: Path           # root CA certificate (the trust anchor given to verifiers)
    intermediate: Path   # intermediate CA certificate (carried in the bundle)
    leaf: Path           # code-signing leaf certificate
    leaf_key: Path       # its private key
    bad_leaf: Path       # a TLS-server leaf from the same intermediate (not for signing)
    bad_leaf_key: Path


def make_pki(d: Path, curve) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = ec.generate_private_key(curve())
    root = _cert("moat test root CA", root_key, None, None, ca=True, path_len=1,
                 not_before=now - datetime.timedelta(days=2))
    int_key = ec.generate_private_key(curve())
    inter = _cert("moat test intermediate CA", int_key, root, root_key, ca=True, path_len=0,
                  not_before=now - datetime.timedelta(days=2))
    leaf_key = ec.generate_private_key(curve())
    leaf = _cert("moat test model signer", leaf_key, inter, int_key, ca=False,
                 not_before=now - datetime.timedelta(hours=1))
    bad_key = ec.generate_private_key(curve())
    bad = _cert("server.example.com", bad_key, inter, int_key, ca=False, leaf_usage="tls-server",
                not_before=now - datetime.timedelta(hours=1))
    return Pki(
        root=_pem(d / "root.pem", root),
        intermediate=_pem(d / "intermediate.pem", inter),
        leaf=_pem(d / "leaf.pem", leaf),
        leaf_key=write_private(d / "leaf.key.pem", leaf_key),
        bad_leaf=_pem(d / "bad-leaf.pem", bad),
        bad_leaf_key=write_private(d / "bad-leaf.key.pem", bad_key),
    )
