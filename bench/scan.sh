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
if [ ! -x "$peers_venv/bin/picklescan" ]; then
  python3 -m venv "$peers_venv"
  # fickling 0.1.x imports typing_extensions without declaring it.
  "$peers_venv/bin/pip" install -q picklescan modelscan fickling typing_extensions numpy
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
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
calc() { awk "BEGIN { print $1 }"; }
timeit() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1 || true; e=$(date +%s.%N); calc "$e - $s"; }
runs="${RUNS:-3}"
t_moat=$(for _ in $(seq "$runs"); do timeit "$MOAT" scan "$big"; done | median)
t_pick=$(for _ in $(seq "$runs"); do timeit "$peers_venv/bin/picklescan" -p "$big"; done | median)
t_ms=$(for _ in $(seq "$runs"); do timeit "$peers_venv/bin/modelscan" -p "$big"; done | median)
echo
echo "2 GB folder ($bytes bytes, page cache warm), median of $runs:"
printf '| moat scan | %.3f s |\n| picklescan | %.3f s (%.0fx moat) |\n| modelscan | %.3f s (%.0fx moat) |\n' \
  "$t_moat" "$t_pick" "$(calc "$t_pick / $t_moat")" "$t_ms" "$(calc "$t_ms / $t_moat")"
echo "(scratch folder: $WORK)"
