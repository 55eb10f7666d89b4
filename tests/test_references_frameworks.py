"""The three op-built references on their own — Candle, tinygrad, JAX (llorch_cpud/validate/references/):
for each, all twelve GPT-2 checkpoints on the full-size fixture, every GPT-2 negative control caught at
its checkpoint with that framework as the only reference, and the same on the real SmolLM2 (Llama
family) GGUF.

A reference is loaded once per model (module-scoped, parametrized fixtures); its answers are memoised
(they do not depend on our engine), so each negative control costs one run of our side. When a
framework cannot run here its tests skip with its reason.

- Candle: Llama weights from candle's own GGUF loader and dequantizer (candle.utils.load_gguf), so it
  is the reference that checks our Llama path end to end: every Llama negative control runs against it.
- JAX: float64 (see jax_ref.py); its Llama weights are the engine's dequantized ones, so its Llama run
  checks the model arithmetic, not dequantization. Its reference side is fast: every control runs.
- tinygrad: float64 (see tinygrad_ref.py), needs clang at run time, compiles kernels into a temporary
  cache folder (tests/_references_harness.py sets CACHEDB); Llama weights from tinygrad's own GGUF reader
  and dequantizer. It spends ~0.3 s of Python scheduling per layer and forward pass, so on the 30-layer
  Llama it generates 1 greedy token and runs one Llama-specific negative control, at the prompt only: its
  forward over prompt + forced tokens (the decode positions) is a new shape to compile, 590 s measured here.

Every other run checks decode positions too (runner.check, as `validate` does).
"""

from __future__ import annotations

import pytest

from _references_harness import assert_all_pass, assert_bug_caught, load_pair, run
from llorch_cpud.validate.bugs import BUGS, LLAMA_BUGS

# per reference: greedy tokens on the Llama model, which Llama negative controls run against it, and whether
# its Llama runs check decode positions too
REFERENCES = {
    "candle": {"llama_tokens": 4, "llama_bugs": list(LLAMA_BUGS)},
    "tinygrad": {"llama_tokens": 1, "llama_bugs": ["gqa_modulo_heads"], "llama_decode": False},
    "jax": {"llama_tokens": 4, "llama_bugs": list(LLAMA_BUGS)},
}


@pytest.fixture(scope="module", params=list(REFERENCES))
def small(request, gpt2_small):
    return request.param, load_pair(request.param, gpt2_small, "gpt2")


@pytest.fixture(scope="module")
def smollm2(request, smollm2_gguf):
    return request.param, load_pair(request.param, smollm2_gguf, "llama")


@pytest.mark.parametrize("name", list(REFERENCES))
def test_gpt2_full_all_twelve_checkpoints(gpt2_full, name):
    engine, ref = load_pair(name, gpt2_full, "gpt2")
    failed, results = run(engine, ref, "gpt2", n_tokens=8, prompt="Hello.")
    assert_all_pass(results, "gpt2")
    by = {r.id: r for r in results}
    assert by[1].max_abs_diff <= 2e-6  # LayerNorm on real-size activations: far inside 1e-5
    assert by[8].max_abs_diff <= 1e-4 and by[9].max_abs_diff == 0.0 and by[12].status == "pass"
    versions = ref.versions()
    assert versions["weights"], versions  # says where the weights came from


def test_gpt2_small_clean_engine_passes(small):
    _, pair = small
    failed, results = run(*pair, "gpt2")
    assert failed == [], results


@pytest.mark.parametrize("bug", list(BUGS))
def test_gpt2_negative_control_caught(small, bug):
    _, (engine, ref) = small
    assert_bug_caught(engine, ref, "gpt2", bug)
    assert run(engine, ref, "gpt2")[0] == []  # the injection was undone


@pytest.mark.parametrize("smollm2", list(REFERENCES), indirect=True)
def test_llama_all_twelve_checkpoints(smollm2):
    name, (engine, ref) = smollm2
    failed, results = run(engine, ref, "llama", n_tokens=REFERENCES[name]["llama_tokens"],
                          decode=REFERENCES[name].get("llama_decode", True))
    assert_all_pass(results, "llama")
    assert {r.id: r for r in results}[8].max_abs_diff <= 3e-4


@pytest.mark.parametrize("smollm2, bug", [(n, b) for n, c in REFERENCES.items() for b in c["llama_bugs"]],
                         indirect=["smollm2"])
def test_llama_negative_control_caught(smollm2, bug):
    name, pair = smollm2
    assert_bug_caught(*pair, "llama", bug, n_tokens=REFERENCES[name]["llama_tokens"],
                      decode=REFERENCES[name].get("llama_decode", True))
