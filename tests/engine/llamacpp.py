"""Runs llama.cpp (the build from scripts/llama_cpp.sh, through the
`llama_cpp` Python bindings) and moat's `probe` the same way: greedy decoding
from a prompt of token ids, with the full logits of every step.

Settings that matter for a like-for-like comparison with moat's engine:
  * KV cache in F32 (llama.cpp defaults to F16; moat keeps f32 K/V);
  * flash attention off (llama.cpp's CPU flash attention converts Q to F16);
  * the prompt evaluated in one batch, then one token per step, as moat does.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def llama_cpp_dir() -> Path:
    """The cached llama.cpp build; builds it (once) if the caller did not say
    where it is. Sets LLAMA_CPP_LIB_PATH so the bindings load that build."""
    d = os.environ.get("MOAT_LLAMA_CPP_DIR")
    if not d:
        r = subprocess.run([str(REPO / "scripts" / "llama_cpp.sh")], stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"scripts/llama_cpp.sh failed ({r.returncode}); see its stderr above")
        d = r.stdout.strip().splitlines()[-1]
        os.environ["MOAT_LLAMA_CPP_DIR"] = d
    os.environ["LLAMA_CPP_LIB_PATH"] = str(Path(d) / "lib")
    return Path(d)


def llama_cpp_greedy(model: Path, prompt: list[int], steps: int, threads: int = 2) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits that chose each of them (steps x vocab)."""
    llama_cpp_dir()
    import llama_cpp  # after LLAMA_CPP_LIB_PATH is set

    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=max(64, len(prompt) + steps + 8),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )
    try:
        llm.eval(prompt)
        tokens, logits = [], []
        for _ in range(steps):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            tok = int(np.argmax(row))
            tokens.append(tok)
            logits.append(row)
            llm.eval([tok])
        return tokens, np.stack(logits)
    finally:
        llm.close()


def probe_path() -> Path:
    p = os.environ.get("MOAT_PROBE")
    if p:
        return Path(p)
    target = os.environ.get("CARGO_TARGET_DIR") or str(Path.home() / ".cache" / "moat" / "target")
    return Path(target) / "debug" / "examples" / "probe"


def probe_greedy(model: Path, prompt: list[int], steps: int, threads: int = 2) -> tuple[list[int], np.ndarray]:
    """moat's engine through `probe ... greedy` (crates/moat-engine/examples/probe.rs)."""
    probe = probe_path()
    if not probe.is_file():
        raise FileNotFoundError(
            f"moat's probe is not at {probe}: build it with `cargo build -p moat-engine --example probe` "
            "or point MOAT_PROBE at it"
        )
    cmd = [str(probe), "--model", str(model), "--threads", str(threads), "greedy",
           "--prompt", ",".join(map(str, prompt)), "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout)
    return [int(t) for t in out["tokens"]], np.asarray(out["logits"], dtype=np.float32)


def margins(logits: np.ndarray) -> np.ndarray:
    """Per step: (top-1 − top-2) / std of that step's logits."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) / logits.std(axis=-1)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| over all steps, relative to the std of `want`'s logits."""
    return float((np.abs(got - want).max(axis=-1) / want.std(axis=-1)).max())
