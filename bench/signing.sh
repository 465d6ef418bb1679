#!/usr/bin/env bash
# OpenSSF model signing, `key` method (ECDSA P-256): `moat sign key` and
# `moat verify-signature key` against the reference tool (`model_signing`
# CLI, PyPI model-signing as pinned in scripts/requirements-test.txt), on the
# r1-distill-qwen-1.5b demo preset (bf16: 2 safetensors shards + 5 small
# files, 3.56 GB), in the same run, warm page cache, median of RUNS (default
# 3). Both tools hash with whole-file serialization (the tool's CLI default);
# a second table does the same with 1 GB file shards (`--use-shards`; the
# tool's CLI has no shard option, so it is driven through its Python API).
#   bench/signing.sh [DTYPE]   (bf16 default; f32 gives 4 shards, 7.1 GB)
source "$(dirname "$0")/common.sh"
dtype="${1:-bf16}"
runs="${RUNS:-3}"
build_release

# The reference tool, in the test venv (the same one scripts/test.sh makes).
VENV="${MOAT_TEST_VENV:-$HOME/.cache/moat/venv}"
if [ ! -x "$VENV/bin/model_signing" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/scripts/requirements-test.txt" >&2
fi
PY="$VENV/bin/python"
MS="$VENV/bin/model_signing"
ms_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("model-signing"))')

model="$WORK/r1-$dtype"
if [ ! -d "$model" ]; then
  "$MOAT" demo-model "$model" --preset r1-distill-qwen-1.5b --dtype "$dtype" --seed 1 >/dev/null
fi
key="$WORK/p256.key.pem"
pub="$WORK/p256.pub.pem"
if [ ! -f "$key" ]; then
  "$PY" - "$key" "$pub" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
k = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], "wb").write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
open(sys.argv[2], "wb").write(k.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
EOF
fi
# Signatures live outside the model folder, so neither tool has to skip them.
sig_moat="$WORK/moat.sig"
sig_ms="$WORK/model_signing.sig"
sig_moat_sh="$WORK/moat-shards.sig"
sig_ms_sh="$WORK/model_signing-shards.sig"

files=("$model"/*)
bytes=$(cat "${files[@]}" | wc -c)
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
calc() { awk "BEGIN { print $1 }"; }
# timeit CMD... → LAST (seconds); aborts the bench if CMD fails.
timeit() {
  local s e
  s=$(date +%s.%N)
  "$@" >/dev/null 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; echo "bench: failed: $*" >&2; exit 1; }
  e=$(date +%s.%N)
  LAST=$(calc "$e - $s")
}
bench() { local t=(); for _ in $(seq "$runs"); do timeit "$@"; t+=("$LAST"); done; printf '%s\n' "${t[@]}" | median; }

ms_shards() {  # ms_shards sign|verify: the tool's Python API with 1 GB shards
  "$PY" - "$1" "$model" "$key" "$pub" "$sig_ms_sh" <<'EOF'
import sys
import model_signing
op, model, key, pub, sig = sys.argv[1:]
if op == "sign":
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization()
    ).sign(model, sig)
else:
    # The shard size has to be given: model_signing 1.1.1 writes it as a JSON
    # float and its own guess from the signature then fails.
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization()
    ).verify(model, sig)
EOF
}

cat "${files[@]}" >/dev/null  # warm the page cache
# Warm-up, and a correctness check: each tool verifies the other's signature.
timeit "$MOAT" sign key "$model" --private-key "$key" --signature "$sig_moat"
timeit "$MS" sign key "$model" --private_key "$key" --signature "$sig_ms"
timeit "$MS" verify key "$model" --public_key "$pub" --signature "$sig_moat"
timeit "$MOAT" verify-signature key "$model" --public-key "$pub" --signature "$sig_ms"
timeit "$MOAT" sign key "$model" --private-key "$key" --signature "$sig_moat_sh" --use-shards
timeit ms_shards sign
timeit ms_shards verify
timeit "$MOAT" verify-signature key "$model" --public-key "$pub" --signature "$sig_ms_sh"
cp "$sig_moat_sh" "$sig_ms_sh" && timeit ms_shards verify  # the tool checks moat's shard signature
timeit ms_shards sign

t_ms_start=$(bench "$MS" verify key --help)
t_moat_sign=$(bench "$MOAT" sign key "$model" --private-key "$key" --signature "$sig_moat")
t_ms_sign=$(bench "$MS" sign key "$model" --private_key "$key" --signature "$sig_ms")
t_moat_verify=$(bench "$MOAT" verify-signature key "$model" --public-key "$pub" --signature "$sig_moat")
t_ms_verify=$(bench "$MS" verify key "$model" --public_key "$pub" --signature "$sig_ms")
t_moat_sign_sh=$(bench "$MOAT" sign key "$model" --private-key "$key" --signature "$sig_moat_sh" --use-shards)
t_ms_sign_sh=$(bench ms_shards sign)
t_moat_verify_sh=$(bench "$MOAT" verify-signature key "$model" --public-key "$pub" --signature "$sig_moat_sh")
t_ms_verify_sh=$(bench ms_shards verify)

mbps() { printf '%.0f' "$(calc "$bytes / $1 / 1000000")"; }
row() { printf '%-34s %6.2f s  %6s MB/s\n' "$1" "$2" "$(mbps "$2")"; }
ratio() { printf '%-34s %6.2fx\n' "$1" "$(calc "$2 / $3")"; }
echo "files: ${#files[@]}, $bytes bytes ($dtype), $(nproc) cores, P-256, median of $runs"
echo "reference: model_signing $ms_version ($("$PY" -c 'import platform; print("CPython", platform.python_version())'))"
echo "-- whole-file serialization (method \"files\", both CLIs)"
row "moat sign key" "$t_moat_sign"
row "model_signing sign key" "$t_ms_sign"
ratio "  sign: moat speed-up" "$t_ms_sign" "$t_moat_sign"
row "moat verify-signature key" "$t_moat_verify"
row "model_signing verify key" "$t_ms_verify"
ratio "  verify: moat speed-up" "$t_ms_verify" "$t_moat_verify"
echo "-- 1 GB shards (method \"shards\"; moat --use-shards, tool via its Python API)"
row "moat sign key --use-shards" "$t_moat_sign_sh"
row "model_signing (API) sign, shards" "$t_ms_sign_sh"
ratio "  sign: moat speed-up" "$t_ms_sign_sh" "$t_moat_sign_sh"
row "moat verify-signature key" "$t_moat_verify_sh"
row "model_signing (API) verify, shards" "$t_ms_verify_sh"
ratio "  verify: moat speed-up" "$t_ms_verify_sh" "$t_moat_verify_sh"
printf 'model_signing start-up alone (verify key --help): %.2f s, included above\n' "$t_ms_start"
echo "(scratch folder: $WORK)"
