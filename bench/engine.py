"""Helpers of bench/engine.sh (moat's CPU engine vs llama.cpp, issue 9 Measure):

  engine.py bandwidth [--threads N]        memory copy bandwidth, GB/s (JSON)
  engine.py weight-bytes FILE.gguf         bytes of weights read per decoded
                                           token: all tensors but token_embd
                                           (an embedding lookup reads one row)
  engine.py table RESULTS.jsonl            the markdown table of a run

Bandwidth: N threads each stream their own 512 MiB buffer (numpy and BLAS
drop the GIL; run with OPENBLAS_NUM_THREADS=1 so each dot is one thread),
best of 5. The bound uses the read figure, since decoding reads every weight
once per token and writes almost nothing; the copy figure (STREAM's
convention: read + written bytes) is printed for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np


def bandwidth(threads: int, mib: int = 512, reps: int = 5) -> dict:
    """Best of `reps`: read (each thread a BLAS dot of its own buffer with
    itself: one read stream, nothing written: what decoding does to weights)
    and copy (STREAM's convention, bytes read + written)."""
    n = mib * 1024 * 1024 // 8
    src = [np.ones(n, dtype=np.float64) for _ in range(threads)]
    dst = [np.zeros(n, dtype=np.float64) for _ in range(threads)]

    def run(op, bytes_per_thread: int) -> float:
        best = 0.0
        for _ in range(reps):
            barrier = threading.Barrier(threads + 1)

            def work(i: int) -> None:
                barrier.wait()
                op(i)

            ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for t in ts:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in ts:
                t.join()
            best = max(best, threads * bytes_per_thread / (time.perf_counter() - t0) / 1e9)
        return best

    read = run(lambda i: src[i] @ src[i], n * 8)
    copy = run(lambda i: np.copyto(dst[i], src[i]), 2 * n * 8)
    return {"threads": threads, "read_gbs": read, "copy_gbs": copy}


def weight_bytes(path: Path) -> int:
    import gguf

    r = gguf.GGUFReader(path)
    return int(sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight"))


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    meta = next(r for r in rows if r["kind"] == "meta")
    out = [
        f"CPU: {meta['cpu']}; threads: {meta['threads']}; memory bandwidth ({meta['threads']} threads): "
        f"read {meta['read_gbs']:.1f} GB/s, copy {meta['copy_gbs']:.1f} GB/s; llama.cpp {meta['llama_cpp']}; "
        f"load average at start: {meta['load']}, at end: "
        f"{next((r['load'] for r in rows if r['kind'] == 'end'), 'n/a')}",
        "",
        "| type | weights read/token | llama.cpp prompt tok/s | moat prompt tok/s | prompt ratio "
        "| llama.cpp decode tok/s | moat decode tok/s | decode ratio | bandwidth bound tok/s "
        "| moat decode % of bound | llama.cpp % of bound | moat RSS / weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for q in meta["types"]:
        ll = [r for r in rows if r["kind"] == "llama.cpp" and r["type"] == q]
        mo = [r for r in rows if r["kind"] == "moat" and r["type"] == q]
        wb = next(r["weight_bytes"] for r in rows if r["kind"] == "weights" and r["type"] == q)
        bound = meta["read_gbs"] * 1e9 / wb

        def med(rs, k):
            vals = [r[k] for r in rs if r.get(k) is not None]
            return statistics.median(vals) if vals else None

        lp, ld = med(ll, "prompt_tok_s"), med(ll, "decode_tok_s")
        mp, md = med(mo, "prompt_tok_s"), med(mo, "decode_tok_s")
        rss = med(mo, "rss_bytes")
        mweights = med(mo, "weight_bytes")

        def f(x, fmt="{:.1f}"):
            return "n/a" if x is None else fmt.format(x)

        size = f"{wb / 1e9:.2f} GB" if wb >= 1e8 else f"{wb / 1e6:.2f} MB"
        out.append(
            f"| {q} | {size} | {f(lp)} | {f(mp)} | {f(mp / lp if mp and lp else None, '{:.2f}x')} "
            f"| {f(ld)} | {f(md)} | {f(md / ld if md and ld else None, '{:.2f}x')} | {bound:.1f} "
            f"| {f(100 * md / bound if md else None, '{:.0f} %')} | {f(100 * ld / bound if ld else None, '{:.0f} %')} "
            f"| {f(rss / mweights if rss and mweights else None, '{:.2f}')} |"
        )
    streams = [r for r in rows if r["kind"] == "streams"]
    if streams:
        out += ["", "| type | moat decode, 1 stream | moat aggregate decode, 8 streams | ratio |", "|---|---|---|---|"]
        for r in streams:
            one, eight = r.get("one"), r.get("eight")
            ratio = f"{eight / one:.2f}x" if one and eight else "n/a"
            out.append(f"| {r['type']} | {one} | {eight} | {ratio} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bandwidth")
    b.add_argument("--threads", type=int, default=2)
    w = sub.add_parser("weight-bytes")
    w.add_argument("file", type=Path)
    t = sub.add_parser("table")
    t.add_argument("results", type=Path)
    a = ap.parse_args()
    if a.cmd == "bandwidth":
        print(json.dumps(bandwidth(a.threads)))
    elif a.cmd == "weight-bytes":
        print(weight_bytes(a.file))
    else:
        print(table(a.results))


if __name__ == "__main__":
    sys.exit(main())
