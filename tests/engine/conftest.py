"""Fixtures for the engine parity tests: the llama.cpp build, and tiny
random-weight models (GGUF F32/F16, llama-quantize'd Q8_0/Q4_0/Q4_K_M/Q6_K,
and the HF safetensors folder of the same weights), made once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_gguf  # noqa: E402
from llamacpp import llama_cpp_dir  # noqa: E402

QTYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K"]
TYPES = ["F32", "F16"] + QTYPES

# variant name -> (arch, Llama-3.1 rope scaling)
VARIANTS = {
    "qwen2": ("qwen2", False),
    "llama": ("llama", False),
    "llama-rope-scaled": ("llama", True),
}
SEED = 9


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    return llama_cpp_dir()


class Models:
    """Lazily writes each variant's files under one session directory."""

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


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Path) -> Models:
    return Models(tmp_path_factory.mktemp("engine-models"), llama_cpp)
