#!/usr/bin/env bash
# Runs every test of moat, after installing what the tests need:
#   - a Python virtual environment with the official `openai` SDK, pytest,
#     `model-signing` (the reference signer for tests/signing) and moto
#     (a real KMS API on loopback for the encryption tests);
#   - redis-server (Debian) for the shared rate-limit tests;
#   - prometheus and promtool (Debian) for the alert-rule unit tests and the
#     real-Prometheus scrape test (tests/ops);
#   - llama.cpp, built once from the llama-cpp-python sdist (scripts/llama_cpp.sh,
#     cached; cmake + g++ from Debian), the second implementation the engine's
#     parity tests (tests/engine) compare moat's CPU engine with;
#   - nothing else: all other tests are Rust tests that start the real
#     `moat` binary (and the servers above) on loopback.
# The cargo target directory is cached outside the clone so later runs on
# the same machine are warm (override with CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moat/target}"
VENV="${MOAT_TEST_VENV:-$HOME/.cache/moat/venv}"
step() { printf '\n== %s\n' "$*"; }

step "system packages the tests start (redis-server)"
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # Debian starts the service on install; tests run their own on loopback.
    service redis-server stop >/dev/null 2>&1 || true
  else
    echo "redis-server is missing: install the Debian package redis-server and re-run" >&2
    exit 1
  fi
fi
export MOAT_REQUIRE_REDIS=1

step "system packages for the operations tests (prometheus, promtool)"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    # Debian starts the service on install; the tests run their own.
    service prometheus stop >/dev/null 2>&1 || true
  else
    echo "prometheus/promtool are missing: install the Debian package prometheus and re-run" >&2
    exit 1
  fi
fi

step "python test environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian splits venv support out of python3.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$VENV"
    else
      echo "python3 -m venv failed: install python3-venv (Debian) and re-run" >&2
      exit 1
    fi
  fi
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r scripts/requirements-test.txt

step "llama.cpp for the engine parity tests (built once, cached)"
MOAT_LLAMA_CPP_DIR="$(scripts/llama_cpp.sh "$VENV")"
export MOAT_LLAMA_CPP_DIR

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# unsafe_code is denied workspace-wide; the one audited exception is the SIMD
# kernel module (docs/security.md, "Unsafe code"). Anywhere else is a failure.
if grep -rln 'allow(unsafe_code)' crates --include='*.rs' | grep -v '^crates/moat-engine/src/cpu/quant/simd'; then
  echo "allow(unsafe_code) outside crates/moat-engine/src/cpu/quant/simd*" >&2
  exit 1
fi

step "rust tests (unit + integration against the real binary)"
# The KMS tests start moto's server (a real KMS API) on a loopback port.
export MOAT_MOTO_SERVER="$VENV/bin/moto_server"
cargo build --workspace --locked
cargo test --workspace --locked

step "end to end: the official openai SDK, signing interop with model_signing, the scanner corpus and SARIF schema"
MOAT_BIN="$CARGO_TARGET_DIR/debug/moat" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e tests/signing tests/scan

step "engine parity: moat's CPU engine against llama.cpp on the same random-weight models"
cargo build --locked -p moat-engine --example probe
MOAT_PROBE="$CARGO_TARGET_DIR/debug/examples/probe" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/engine

step "alert rules: promtool check and unit tests"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

step "operations: real Prometheus scraping moat, dashboard and docs against a real scrape, Helm chart"
MOAT_BIN="$CARGO_TARGET_DIR/debug/moat" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/ops

step "fuzz smoke (20 s per target)"
# cargo-fuzz needs nightly-only compiler flags (sanitizers); RUSTC_BOOTSTRAP
# lets the stable toolchain, the only one this machine has, accept them.
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
for target in $(cargo fuzz list --fuzz-dir fuzz); do
  # Fuzz a scratch copy so the committed seed corpus stays as reviewed.
  corpus="$(mktemp -d)"
  cp fuzz/corpus/"$target"/* "$corpus"/ 2>/dev/null || true
  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" "$corpus" -- -max_total_time=20
  rm -rf "$corpus"
done

step "all tests passed"
