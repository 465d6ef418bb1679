"""The tiny random-weight models of the engine parity tests: GGUF F32/F16,
llama-quantize'd Q8_0/Q4_0/Q4_K_M/Q6_K, and the HF safetensors folder of the
same weights, written lazily under one directory per session. (Kept out of
conftest.py so test modules can import it by a name no other suite uses.)"""

from __future__ import annotations

from pathlib import Path

import make_gguf

QTYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K"]
TYPES = ["F32", "F16"] + QTYPES

# variant name -> (arch, Llama-3.1 rope scaling)
VARIANTS = {
    "qwen2": ("qwen2", False),
    "llama": ("llama", False),
    "llama-rope-scaled": ("llama", True),
}
SEED = 9


class Models:
    """Writes each variant's files on first use."""

    def __init__(self, root: Path, llama_cpp: Path):
        self.root = root
        self.quantize_bin = llama_cpp / "bin" / "llama-quantize"
        self.done: set[str] = set()

    def dir(self, variant: str) -> Path:
        d = self.root / variant
        if variant not in self.done:
            arch, scaled = VARIANTS[variant]
            shape = make_gguf.shape_for(arch, "tiny", scaled)
            d.mkdir(parents=True, exist_ok=True)
            f32 = make_gguf.write_gguf(d / "model-F32.gguf", arch, shape, SEED, "f32")
            make_gguf.write_gguf(d / "model-F16.gguf", arch, shape, SEED, "f16")
            make_gguf.write_hf(d / "hf", arch, shape, SEED)
            for q in QTYPES:
                make_gguf.quantize(self.quantize_bin, f32, d / f"model-{q}.gguf", q)
            self.done.add(variant)
        return d

    def gguf(self, variant: str, qtype: str) -> Path:
        return self.dir(variant) / f"model-{qtype}.gguf"

    def hf(self, variant: str) -> Path:
        return self.dir(variant) / "hf"
