"""Runs the scanner corpus through moat, picklescan, modelscan and fickling.

    python bench/scan_compare.py MOAT_BIN PEERS_BIN_DIR WORKDIR

Each tool sees the same case folders (built by tests/scan/corpus.py) and is
asked the question a deployment pipeline asks: "may this folder be loaded?".
A tool flags a case when it exits non-zero or reports an issue for it
(picklescan: non-zero exit; modelscan: any issue or error in its JSON
report; fickling: `--check-safety` non-zero on any non-text file of the
case, since it takes one pickle file at a time). Prints a Markdown table of per-case verdicts,
misses and false positives per tool, and wall time per tool (whole corpus,
one process per case as a pipeline would run it, plus moat in one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "scan"))

import corpus  # noqa: E402


def run(cmd: list[str], timeout=300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", "timeout")


def files_of(case_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(case_dir):
        out.extend(os.path.join(dirpath, n) for n in names)
    return sorted(out)


def picklescan(peers: str, case_dir: str) -> bool:
    p = run([f"{peers}/picklescan", "-p", case_dir])
    return p.returncode != 0


def modelscan(peers: str, case_dir: str, scratch: str) -> bool:
    out = os.path.join(scratch, "modelscan.json")
    if os.path.exists(out):
        os.remove(out)
    p = run([f"{peers}/modelscan", "-p", case_dir, "-r", "json", "-o", out])
    try:
        with open(out) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return p.returncode not in (0, 3)  # 3: no supported files found
    return bool(report.get("issues")) or bool(report.get("errors"))


# fickling analyses pickles only; documents are not given to it (a parse
# failure on a README would count against it unfairly).
TEXT_SUFFIXES = (".json", ".md", ".txt", ".py", ".jinja", ".key", "LICENSE")


def fickling(peers: str, case_dir: str, scratch: str) -> bool:
    flagged = False
    for f in files_of(case_dir):
        if f.endswith(TEXT_SUFFIXES):
            continue
        p = run([f"{peers}/fickling", "--check-safety", "--json-output", os.path.join(scratch, "fickling.json"), f])
        flagged |= p.returncode != 0
    return flagged


def moat_per_case(moat: str, case_dir: str) -> bool:
    p = run([moat, "scan", "--format", "json", case_dir])
    return p.returncode != 0


def main():
    moat, peers, work = sys.argv[1], sys.argv[2], sys.argv[3]
    root = os.path.join(work, "corpus")
    expected = corpus.build(root)
    os.remove(os.path.join(root, "expected.json"))
    cases = list(expected)
    nfiles = sum(len(files_of(os.path.join(root, c))) for c in cases)

    tools = {
        "moat": lambda d: moat_per_case(moat, d),
        "picklescan": lambda d: picklescan(peers, d),
        "modelscan": lambda d: modelscan(peers, d, work),
        "fickling": lambda d: fickling(peers, d, work),
    }
    verdicts: dict[str, dict[str, bool]] = {}
    wall: dict[str, float] = {}
    for tool, fn in tools.items():
        t0 = time.perf_counter()
        verdicts[tool] = {c: fn(os.path.join(root, c)) for c in cases}
        wall[tool] = time.perf_counter() - t0

    # moat in one process over the whole corpus (how `moat pull` runs it),
    # median of 11 runs: a single run of a few milliseconds is noise.
    def median_wall(cmd):
        times = []
        for _ in range(11):
            t0 = time.perf_counter()
            out = run(cmd)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], out

    wall_one, one = median_wall([moat, "scan", "--format", "json", root])
    report = json.loads(one.stdout)
    # picklescan in one process over the whole corpus too (same question,
    # same invocation shape), for a like-for-like files/s figure.
    wall_pick_one, _ = median_wall([f"{peers}/picklescan", "-p", root])
    flagged_one = {p["path"].split("/", 1)[0] for p in report["files"] if p["verdict"] != "clean"}
    assert flagged_one == {c for c in cases if verdicts["moat"][c]}, "moat: one-process and per-case runs disagree"

    names = list(tools)
    print(f"Corpus: {len(cases)} cases ({sum(v['malicious'] for v in expected.values())} malicious, "
          f"{sum(not v['malicious'] for v in expected.values())} benign), {nfiles} files.\n")
    print("| case | class | malicious | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for c in cases:
        meta = expected[c]
        cells = []
        for t in names:
            got = verdicts[t][c]
            ok = got == meta["malicious"]
            cells.append(("flagged" if got else "passed") + ("" if ok else (" **MISS**" if meta["malicious"] else " **FP**")))
        print(f"| {c} | {meta['class']} | {'yes' if meta['malicious'] else 'no'} | " + " | ".join(cells) + " |")
    print()
    print("| tool | misses (malicious passed) | false positives (benign flagged) | wall time, one process per case | files/s |")
    print("|---|---|---|---|---|")
    for t in names:
        miss = sum(1 for c in cases if expected[c]["malicious"] and not verdicts[t][c])
        fp = sum(1 for c in cases if not expected[c]["malicious"] and verdicts[t][c])
        print(f"| {t} | {miss} | {fp} | {wall[t]:.2f} s | {nfiles / wall[t]:.1f} |")
    print(f"| moat (one process, whole corpus, median of 11) | | | {wall_one * 1000:.1f} ms | {nfiles / wall_one:.0f} |")
    print(f"| picklescan (one process, whole corpus, median of 11) | | | {wall_pick_one * 1000:.1f} ms | {nfiles / wall_pick_one:.0f} |")
    print()
    print(f"files/s, one process each over the whole corpus: moat {wall_pick_one / wall_one:.0f}x picklescan; "
          f"one process per case: {wall['picklescan'] / wall['moat']:.1f}x")


if __name__ == "__main__":
    main()
