"""`--numerics q8` end to end on the real SmolLM2 Q4_1 GGUF: the model computes with 8-bit activations,
`validate` holds it to its declared profile (NUMERICS_TOLERANCES) and says so in every row it changes,
the injected bugs are still caught where expected, and a model without quantized weights refuses the mode.
The kernels themselves are checked against ggml's block formulas in tests/test_kernels_q8.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llorch_cpud import kernels
from llorch_cpud.engine import load_engine
from llorch_cpud.validate import references
from llorch_cpud.validate.bugs import LLAMA_BUGS, inject
from llorch_cpud.validate.checkpoints import CHECKPOINTS, NUMERICS_TOLERANCES
from llorch_cpud.validate.runner import check

from _references_harness import Memo  # noqa: E402 (tests/)

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built")
PROFILE = NUMERICS_TOLERANCES["q8"]


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    return load_engine(str(smollm2_gguf), numerics="q8")[0]


@pytest.fixture(scope="module")
def ref(engine, smollm2_gguf):
    """The reference's answers do not depend on our engine: computed once, replayed for each injected bug."""
    r = references.make("transformers")
    r.load(smollm2_gguf, "llama", engine)
    return Memo(r)


def run(engine, ref, prompt="Hello. How are you?"):
    return check(engine, ref, engine.tokenizer.encode(prompt), 6)


def test_q8_engine_passes_its_profile_and_says_so(engine, ref):
    assert engine.model.numerics == "q8"
    results = {r.id: r for r in run(engine, ref)}
    assert all(r.passed for r in results.values()), [(r.id, r.max_abs_diff, r.tolerance) for r in results.values()]
    for cid, tol in PROFILE.items():
        assert results[cid].tolerance == tol and "q8 numerics tolerance (8-bit activations)" in results[cid].note
        assert f"SPEC {CHECKPOINTS[cid][1]:g}".replace("0.0001", "1e-4").replace("0.001", "1e-3") in results[cid].note
    for cid in (1, 4, 9, 11):  # no quantized product in between: SPEC's tolerance, and met
        assert results[cid].tolerance == CHECKPOINTS[cid][1]
    # the 8-bit activations really are in effect: the projections differ from float32's by more than rounding
    assert results[2].max_abs_diff > 1e-3 and results[8].max_abs_diff > 1e-2


@pytest.mark.parametrize("bug", list(LLAMA_BUGS))
def test_injected_bugs_still_caught_in_q8(engine, ref, bug):
    with inject(bug, engine.model) as b:
        failed = [r.id for r in run(engine, ref) if not r.passed]
    assert failed and failed[0] == b.expected, (bug, failed)


def test_q8_and_float32_logits_are_close_but_not_equal(engine, smollm2_gguf):
    f32 = load_engine(str(smollm2_gguf))[0]
    ids = engine.tokenizer.encode("The capital of France is")
    a, b = engine.prefill_logits(ids), f32.prefill_logits(ids)
    diff = np.abs(a - b).max()
    assert 1e-2 < diff < PROFILE[8], diff
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8


def test_cli_q8_validate_report_and_refusal_for_float_models(smollm2_gguf, gpt2_small, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "validate", "--model", str(smollm2_gguf), "--numerics", "q8",
                        "--references", "transformers", "--tokens", "4", "--report", str(tmp_path / "rep")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["numerics"] == "q8" and rep["numerics_tolerances"] == {str(k): v for k, v in PROFILE.items()}
    assert "numerics q8: activations quantized to 8 bits" in r.stdout and "numerics: q8" in r.stdout
    assert "- numerics: q8" in (tmp_path / "rep" / "report.md").read_text()
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "generate", "--model", str(gpt2_small), "--numerics", "q8", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--numerics q8 needs weights held quantized by the C kernels" in r.stderr
