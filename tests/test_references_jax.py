"""The JAX reference (llorch_cpud/validate/references/jax_ref.py) on its own: all twelve GPT-2
checkpoints on the full-size fixture, every GPT-2 negative control caught at its checkpoint with
JAX as the only reference, and the same on the real SmolLM2 (Llama family) GGUF.

The reference is loaded once per model for the module; its answers are memoised (they do not
depend on our engine), so each negative control costs one run of our side. When JAX cannot
run here the tests skip with its reason.

JAX computes in float64 (see jax_ref.py); its Llama weights are the engine's dequantized ones, so its
Llama run checks the model arithmetic, not dequantization.
"""

from __future__ import annotations

import pytest

from _references_harness import assert_all_pass, assert_bug_caught, load_pair, run
from llorch_cpud.validate.bugs import BUGS, LLAMA_BUGS

NAME = "jax"


@pytest.fixture(scope="module")
def small(gpt2_small):
    return load_pair(NAME, gpt2_small, "gpt2")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_pair(NAME, smollm2_gguf, "llama")


def test_gpt2_full_all_twelve_checkpoints(gpt2_full):
    engine, ref = load_pair(NAME, gpt2_full, "gpt2")
    failed, results = run(engine, ref, "gpt2", n_tokens=8, prompt="Hello.")
    assert_all_pass(results, "gpt2")
    by = {r.id: r for r in results}
    assert by[1].max_abs_diff <= 2e-6  # LayerNorm on real-size activations: far inside 1e-5
    assert by[8].max_abs_diff <= 1e-4 and by[9].max_abs_diff == 0.0 and by[12].status == "pass"
    versions = ref.versions()
    assert versions["weights"], versions  # says where the weights came from


def test_gpt2_small_clean_engine_passes(small):
    failed, results = run(*small, "gpt2")
    assert failed == [], results


@pytest.mark.parametrize("bug", list(BUGS))
def test_gpt2_negative_control_caught(small, bug):
    engine, ref = small
    assert_bug_caught(engine, ref, "gpt2", bug)
    assert run(engine, ref, "gpt2")[0] == []  # the injection was undone


def test_llama_all_twelve_checkpoints(smollm2):
    engine, ref = smollm2
    failed, results = run(engine, ref, "llama", n_tokens=4)
    assert_all_pass(results, "llama")
    assert {r.id: r for r in results}[8].max_abs_diff <= 3e-4


# every Llama negative control (JAX's reference side is fast; each costs about one run of our side)
@pytest.mark.parametrize("bug", list(LLAMA_BUGS))
def test_llama_negative_control_caught(smollm2, bug):
    assert_bug_caught(*smollm2, "llama", bug, n_tokens=4)
