#!/usr/bin/env bash
# Builds llama.cpp, the second implementation moat's engine is checked and
# benchmarked against (issue 9), from the sources vendored in the
# `llama-cpp-python` sdist on PyPI (PyPI is a registry this project may use;
# llama.cpp's own repository is not).
#
#   scripts/llama_cpp.sh [VENV]
#
# Builds once, cached under ${MOAT_CACHE:-$HOME/.cache/moat}/llama.cpp-<ver>/:
#   lib/   libllama.so + libggml*.so (CPU backend, -march=native: it runs on
#          the machine that built it)
#   bin/   llama-bench, llama-quantize (same shared libs, found by RPATH)
# then installs the `llama_cpp` Python bindings into VENV (default: the test
# venv) WITHOUT compiling llama.cpp a second time: the bindings load the
# prebuilt lib/ through LLAMA_CPP_LIB_PATH (tests/engine/conftest.py sets it).
# Prints the cache directory on stdout (all progress goes to stderr), so
# callers can `dir="$(scripts/llama_cpp.sh)"`. A second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

# llama-cpp-python 0.3.36 vendors llama.cpp commit 0c1e57098 (its CHANGELOG).
VERSION=0.3.36
LLAMA_CPP_COMMIT=0c1e57098
VENV="${1:-${MOAT_TEST_VENV:-$HOME/.cache/moat/venv}}"
CACHE="${MOAT_CACHE:-$HOME/.cache/moat}"
DIR="$CACHE/llama.cpp-$VERSION"
JOBS="${MOAT_LLAMA_CPP_JOBS:-$(nproc)}"
log() { printf 'llama_cpp.sh: %s\n' "$*" >&2; }

if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing cmake and g++ (Debian)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null
  else
    echo "llama_cpp.sh: cmake and g++ are needed: install the Debian packages cmake and g++" >&2
    exit 1
  fi
fi

mkdir -p "$DIR"
sdist="$DIR/llama_cpp_python-$VERSION.tar.gz"
src="$DIR/src"

if [ ! -f "$DIR/built.ok" ]; then
  start=$(date +%s)
  if [ ! -f "$sdist" ]; then
    log "downloading the llama-cpp-python $VERSION sdist from PyPI"
    tmp="$(mktemp -d)"
    "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      "llama-cpp-python==$VERSION" -d "$tmp" >&2
    mv "$tmp/llama_cpp_python-$VERSION.tar.gz" "$sdist"
    rm -rf "$tmp"
  fi
  rm -rf "$src" "$DIR/build" "$DIR/lib" "$DIR/bin"
  mkdir -p "$src"
  tar -xzf "$sdist" -C "$src" --strip-components=1
  log "building llama.cpp $LLAMA_CPP_COMMIT (libllama, llama-bench, llama-quantize) with $JOBS jobs"
  # Only what moat needs: no tests, examples, server, curl/openssl (the tools
  # never download anything here), no GPU backends.
  cmake -S "$src/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DGGML_BACKEND_DL=OFF \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2
  cmake --build "$DIR/build" -j "$JOBS" --target llama llama-bench llama-quantize >&2
  # Every artefact lands in build/bin (llama.cpp sets the output directories);
  # binaries find the libs there through their build-tree RPATH, so keep it
  # and expose lib/ and bin/ as links.
  ln -sfn build/bin "$DIR/lib"
  ln -sfn build/bin "$DIR/bin"
  for f in libllama.so libggml.so libggml-base.so libggml-cpu.so llama-bench llama-quantize; do
    [ -e "$DIR/build/bin/$f" ] || { echo "llama_cpp.sh: build produced no $f" >&2; exit 1; }
  done
  echo "$LLAMA_CPP_COMMIT" >"$DIR/built.ok"
  log "built in $(($(date +%s) - start)) s"
fi

# The bindings: LLAMA_BUILD=OFF / LLAVA_BUILD=OFF make the package's CMake
# project compile nothing, so the wheel is pure Python and loads lib/ above.
have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
if [ "$have" != "$VERSION" ]; then
  log "installing the llama_cpp Python bindings $VERSION into $VENV (no native build)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VENV/bin/python" -m pip install -q \
    --disable-pip-version-check "$sdist" >&2
fi

echo "$DIR"
