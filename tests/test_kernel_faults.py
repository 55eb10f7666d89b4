"""Negative controls inside the C kernels (scripts/kernel_faults.py): each fault of bugs.KERNEL_FAULTS is compiled
into its own build of the kernels (kernels/c/), and `validate --references transformers` run with that build must fail on
every prompt, first at the checkpoint of the stage the fault breaks - on a synthetic Llama whose matrices are
Q4_1 (as SmolLM2's) and on a synthetic GPT-2, in the numerics each fault lists. The same harness with a build
that has no fault passes (the control). Builds and runs go two at a time (one per core)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from llorch_cpud import kernels
from llorch_cpud.validate.bugs import KERNEL_FAULTS

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

import kernel_faults  # noqa: E402 (scripts/)
from make_llama_gguf import TOKENIZER_KEYS, write_llama_gguf  # noqa: E402 (scripts/)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not kernels.enabled(), reason="C kernels not built")]

PROMPTS = ["The capital of France is", "Hello."]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_gguf, gpt2_small):
    from llorch_cpud.formats.gguf import GGUFFile

    f = GGUFFile.open(smollm2_gguf)
    tok_meta = {k: f.metadata[k] for k in TOKENIZER_KEYS}
    path = tmp_path_factory.mktemp("faults") / "q4_1.gguf"
    q41 = {k: QT.Q4_1 for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    write_llama_gguf(path, tok_meta, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_ff=128, seed=7,
                     types={**q41, "token_embd": QT.Q8_0})
    return {"llama": path, "gpt2": gpt2_small, "smollm2": smollm2_gguf}


@pytest.fixture(scope="module")
def outcomes(models, tmp_path_factory):
    """fault -> [(family, numerics, rows)] for every fault and the control, two builds at a time."""
    # q8's declared profile is SmolLM2's (NUMERICS_TOLERANCES): q8 runs take the real model, whose q8 products are
    # slow without AVX-512 VNNI - so here one prompt and few tokens, for the q8-only fault and the control (the
    # other faults' q8 runs: scripts/kernel_faults.py NAME --numerics q8); GPT-2 has no q8
    jobs = {name: [(fam, num) for fam in f.families for num in f.numerics
                   if num == "float32" or name == "Q8_DROP_BLOCK"] for name, f in KERNEL_FAULTS.items()}
    jobs["NONE"] = [("llama", "float32"), ("gpt2", "float32"), ("llama", "q8")]

    def one(name):
        dest = kernel_faults.build(name, tmp_path_factory.mktemp(f"build-{name}"))
        return name, [(fam, num, kernel_faults.run(dest, models[fam], num, PROMPTS)) if num == "float32" else
                      (fam, num, kernel_faults.run(dest, models["smollm2"], num, PROMPTS[:1], tokens=8))
                      for fam, num in jobs[name]]

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, jobs))


@pytest.mark.parametrize("name", sorted(KERNEL_FAULTS))
def test_validate_fails_first_at_the_faulty_stage(outcomes, name):
    fault = KERNEL_FAULTS[name]
    for family, numerics, rows in outcomes[name]:
        assert len(rows) == (len(PROMPTS) if numerics == "float32" else 1)
        for row in rows:
            where = f"{name} ({fault.description}) on {family}, {numerics}, prompt {row['prompt']!r}"
            assert not row["passed"], f"{where}: validate passed"
            assert row["first_failure"] == fault.expected, f"{where}: first failure {row['first_failure']}: {row}"
            assert row["failing_paths"], where


def test_the_same_build_without_a_fault_passes(outcomes):
    for family, numerics, rows in outcomes["NONE"]:
        for row in rows:
            assert row["passed"], f"control build on {family}, {numerics}: {row}"


def test_production_build_has_no_fault_code():
    from llorch_cpud.kernels import _qkernels

    assert not hasattr(_qkernels, "FAULT")
