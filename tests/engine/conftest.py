"""Fixtures for the engine parity tests: the llama.cpp build
(scripts/llama_cpp.sh, cached) and the tiny models (engine_models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_models import Models  # noqa: E402
from llamacpp import llama_cpp_dir  # noqa: E402


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    return llama_cpp_dir()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Path) -> Models:
    return Models(tmp_path_factory.mktemp("engine-models"), llama_cpp)
