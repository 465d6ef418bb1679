#!/usr/bin/env bash
# `moat scan` against picklescan, modelscan and fickling (from PyPI, in their
# own virtual environment), in the same run:
#   1. the generated corpus (tests/scan/corpus.py): per-case verdicts, misses,
#      false positives and wall time of each tool;
#   2. a ~2 GB PyTorch-layout model folder: scan time, median of RUNS (3).
#   bench/scan.sh
source "$(dirname "$0")/common.sh"
build_release
peers_venv="${PEERS_VENV:-$HOME/.cache/moat/venv-scanners}"
test_venv="${VENV:-$HOME/.cache/moat/venv}"
if [ ! -x "$peers_venv/bin/picklescan" ] || ! "$peers_venv/bin/python" -c "import py7zr" 2>/dev/null; then
  python3 -m venv "$peers_venv"
  # fickling 0.1.x imports typing_extensions without declaring it.
  "$peers_venv/bin/pip" install -q "picklescan[7z]" modelscan fickling typing_extensions numpy
fi
if ! "$test_venv/bin/python" -c 'import numpy, joblib, h5py, onnx, gguf' 2>/dev/null; then
  "$test_venv/bin/pip" install -q -r "$ROOT/scripts/requirements-test.txt"
fi
echo "peers: $("$peers_venv/bin/pip" list 2>/dev/null | grep -iE '^(picklescan|modelscan|fickling) ' | tr -s ' ' | paste -sd, -)"
echo "$(nproc) cores"
echo
"$test_venv/bin/python" "$ROOT/bench/scan_compare.py" "$MOAT" "$peers_venv/bin" "$WORK"

# A 2 GB model folder: one PyTorch zip checkpoint of stored storages (the
# layout torch.save writes) plus the usual JSON files.
big="$WORK/big-model"
if [ ! -d "$big" ]; then
  ROOT="$ROOT" "$test_venv/bin/python" - "$big" <<'EOF'
import os, struct, sys, zipfile
sys.path.insert(0, os.path.join(os.environ.get("ROOT", "."), "tests", "scan"))
import corpus
out = sys.argv[1]
os.makedirs(out)
sd, _ = corpus.state_dict(layers=32, hidden=2048)
pkl = corpus.torch_pickle(sd)
with zipfile.ZipFile(f"{out}/pytorch_model.bin", "w", zipfile.ZIP_STORED, allowZip64=True) as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    chunk = os.urandom(1 << 20)
    for key in range(64):
        with z.open(f"archive/data/{key}", "w", force_zip64=True) as m:
            for _ in range(32):
                m.write(chunk)
    z.writestr("archive/version", "3\n")
corpus.hf_folder(out)
EOF
fi
bytes=$(du -sb "$big" | cut -f1)
cat "$big"/* >/dev/null
# Timed from Python with perf_counter (a shell `date` fork costs as much as
# moat's whole scan here); median of RUNS (default 20).
"$test_venv/bin/python" - "$MOAT" "$peers_venv/bin" "$big" "$bytes" "${RUNS:-20}" <<'EOF'
import statistics, subprocess, sys, time
moat, peers, big, size, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def median_ms(cmd):
    xs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1000
t = {
    "moat scan": median_ms([moat, "scan", big]),
    "picklescan": median_ms([f"{peers}/picklescan", "-p", big]),
    "modelscan": median_ms([f"{peers}/modelscan", "-p", big]),
}
print(f"\n{size / 1e9:.2f} GB model folder (PyTorch zip checkpoint + HF JSON files), page cache warm, median of {runs}:")
print("| tool | time | vs moat |")
print("|---|---|---|")
for k, v in t.items():
    print(f"| {k} | {v:.1f} ms | {v / t['moat scan']:.1f}x |")
EOF
echo "(scratch folder: $WORK)"
