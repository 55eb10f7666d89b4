"""Tiny Llama-family GGUFs written here with gguf-py's GGUFWriter (seeded random weights, the real
SmolLM2 tokenizer metadata): shapes SmolLM2 does not have (multi-head, grouped, multi-query attention,
an untied output.weight, F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensors; a Q4_K/Q5_K/Q6_K file) checked
against transformers loading the same file, plus the loader's errors. Synthetic weights: a pass here says nothing about real weights
(tests/test_llama.py runs the real SmolLM2)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from llorch_cpud import kernels  # noqa: E402
from llorch_cpud.engine import Engine  # noqa: E402
from llorch_cpud.kernels import PackedMatrix, QuantMatrix  # noqa: E402
from llorch_cpud.errors import ModelLoadError  # noqa: E402
from llorch_cpud.formats import load_model  # noqa: E402
from llorch_cpud.formats.gguf import GGUFFile  # noqa: E402
from llorch_cpud.formats.gguf_load import load_gguf_model  # noqa: E402
from llorch_cpud.formats.gguf_load import unpermute_rows  # noqa: E402

from make_llama_gguf import TOKENIZER_KEYS, llamacpp_permute, write_llama_gguf  # noqa: E402 (scripts/)


@pytest.fixture(scope="module")
def tok_meta(smollm2_gguf):
    f = GGUFFile.open(smollm2_gguf)
    return {k: f.metadata[k] for k in TOKENIZER_KEYS}


# n_head, n_kv_head, tied: grouped (2 per KV head), multi-head, multi-query
VARIANTS = {"gqa": (4, 2, False), "mha": (4, 4, True), "mqa": (4, 1, False)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tok_meta):
    out = {}
    for name, (h, kv, tied) in VARIANTS.items():
        path = tmp_path_factory.mktemp("llama_" + name) / f"tiny-{name}.gguf"
        hf = write_llama_gguf(path, tok_meta, n_head=h, n_kv_head=kv, tied=tied, seed=len(out))
        out[name] = (path, hf)
    return out


def test_unpermute_rows_inverts_llamacpp_converter():
    rng = np.random.default_rng(0)
    for n_head, n_kv, hd in [(9, 3, 64), (4, 4, 16), (32, 8, 128), (4, 1, 16)]:
        q = rng.standard_normal((n_head * hd, 8)).astype(np.float32)
        k = rng.standard_normal((n_kv * hd, 8)).astype(np.float32)
        assert np.array_equal(llamacpp_permute(q, n_head, n_head)[unpermute_rows(n_head * hd, n_head)], q)
        assert np.array_equal(llamacpp_permute(k, n_head, n_kv)[unpermute_rows(n_kv * hd, n_kv)], k)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loads_hf_layout_weights(synthetic, variant):
    path, hf = synthetic[variant]
    model, tok = load_gguf_model(path)
    h, kv, tied = VARIANTS[variant]
    assert (model.config.n_head, model.config.n_kv_head, model.config.tied_embeddings) == (h, kv, tied)
    assert model.config.rms_norm_eps == pytest.approx(1e-6) and model.config.rope_base == 10000.0
    assert ("output.weight" in model.tensors()) == (not tied)
    for name in ("blk.0.attn_k.weight", "blk.1.attn_v.weight"):  # F16 / F32: exact up to the F16 rounding
        assert np.abs(model.dense(name) - hf[name]).max() <= 1e-3 * np.abs(hf[name]).max()
    for name in ("blk.0.attn_q.weight", "blk.1.attn_q.weight"):  # Q8_0, un-permuted: within quantization error
        assert np.abs(model.dense(name) - hf[name]).max() <= 0.02 * np.abs(hf[name]).max()
    assert tok.encode("Hello.") == [19556, 30]
    if kernels.enabled():  # every matrix is held for a C kernel: F16 as float16, other types as float32
        w = model.tensors()
        assert isinstance(w["blk.0.attn_q.weight"], QuantMatrix) and w["blk.0.attn_q.weight"].kind == "Q8_0"
        assert isinstance(w["blk.0.attn_k.weight"], PackedMatrix) and w["blk.0.attn_k.weight"].w.dtype == np.float16
        assert isinstance(w["blk.0.attn_v.weight"], PackedMatrix) and w["blk.0.attn_v.weight"].w.dtype == np.float32
        for name, source, kind in (("blk.0.attn_output.weight", "Q4_0", "Q4_1"), ("blk.0.ffn_up.weight", "Q5_0", "Q8_0"),
                                   ("blk.0.ffn_down.weight", "Q5_1", "Q8_DM")):
            assert isinstance(w[name], QuantMatrix) and (w[name].source, w[name].kind) == (source, kind), name
        assert all(isinstance(w[n], np.ndarray) for n in ("output_norm.weight", "blk.0.attn_norm.weight"))
        if not tied:  # output.weight is BF16: kept as bfloat16 bits
            assert isinstance(w["output.weight"], PackedMatrix) and w["output.weight"].w.dtype == np.uint16


def assert_checkpoints_pass_against_transformers(path, model, tok, hf_name: str, ours_name: str):
    """The whole validator on a GGUF file against transformers loading the same file; transformers' tensor
    `hf_name` of layer 1 must be exactly our `ours_name` (the same dequantized, un-permuted weights)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    from llorch_cpud.validate import references
    from llorch_cpud.validate.checkpoints import OurSide, run_checkpoints

    engine = Engine(model, tok)
    ref = references.make("transformers")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_llama._torch_one_thread
    try:
        ref.load(path, "llama", engine)
        theirs = ref.model.model.layers[1].get_submodule(hf_name).weight.detach().numpy()
        assert np.array_equal(theirs, model.dense(ours_name))
        ours = OurSide(engine, tok.encode("Hello. Ünïcode → 東京, code: x = [1, 2]"), 12)
        results = run_checkpoints(engine, ours, ref, "llama")
    finally:
        torch.set_num_threads(n_threads)
    bad = [(r.id, r.name, r.max_abs_diff, r.note) for r in results if not r.passed]
    assert bad == []
    assert results[7].max_abs_diff <= 1e-4  # full logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_checkpoints_pass_against_transformers(synthetic, variant):
    """The whole validator on the synthetic GGUF: GQA, MHA and MQA head layouts, tied and untied heads."""
    path, _ = synthetic[variant]
    model, tok = load_gguf_model(path)
    assert_checkpoints_pass_against_transformers(path, model, tok, "self_attn.q_proj", "blk.1.attn_q.weight")


def test_k_quant_model_is_held_quantized_and_passes_against_transformers(tmp_path, tok_meta):
    """Q4_K, Q5_K and Q6_K matrices (every matrix of this file, embedding and untied head included) run
    on their rewritten blocks (Q4_1F, Q8_DM, Q8_S16) and every checkpoint passes against transformers,
    which dequantizes the same file with gguf-py."""
    k4, k5, k6 = QT.Q4_K, QT.Q5_K, QT.Q6_K
    types = {"attn_q": k4, "attn_k": k6, "attn_v": k5, "attn_output": k6, "ffn_gate": k4, "ffn_up": k5,
             "ffn_down": k4, "token_embd": k6, "output": k4}
    path = tmp_path / "tiny-kquant.gguf"
    write_llama_gguf(path, tok_meta, n_layer=2, n_embd=256, n_head=4, n_kv_head=2, n_ff=512, tied=False, types=types)
    model, tok = load_gguf_model(path)
    if kernels.enabled():
        for name, kind in (("blk.0.attn_q.weight", "Q4_1F"), ("blk.0.attn_k.weight", "Q8_S16"),
                           ("blk.0.attn_v.weight", "Q8_DM"), ("token_embd.weight", "Q8_S16"), ("output.weight", "Q4_1F")):
            assert isinstance(model.tensors()[name], QuantMatrix) and model.tensors()[name].kind == kind, name
    assert_checkpoints_pass_against_transformers(path, model, tok, "mlp.down_proj", "blk.1.ffn_down.weight")


def test_batched_segments_on_synthetic(synthetic):
    from llorch_cpud.engine import Request
    from llorch_cpud.sampling import SamplingParams

    model, tok = load_gguf_model(synthetic["gqa"][0])
    engine = Engine(model, tok)
    reqs = [Request(prompt=p, max_tokens=6, sampling=SamplingParams(temperature=0.0), seed=0)
            for p in ("a", "Hello there, friend", "1 2 3")]
    singles = [[e for e in engine.generate(r)][-1].token_ids for r in reqs]
    seqs = [engine.start(r) for r in reqs]
    while not all(s.done for s in seqs):
        engine.step(seqs)
    assert [s.end.token_ids for s in seqs] == singles


# ---------------------------------------------------------------- errors


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_architecture_names_the_key(tmp_path, tok_meta):
    path = tmp_path / "qwen.gguf"
    write_llama_gguf(path, tok_meta, n_layer=1, arch="mamba")
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(path)
    assert "general.architecture" in one_line(e) and "'mamba'" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "generate", "--model", str(path), "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "general.architecture" in r.stderr


def test_missing_tensor_is_named(tmp_path, tok_meta):
    path = tmp_path / "missing.gguf"
    write_llama_gguf(path, tok_meta, n_layer=2, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    assert "blk.1.ffn_up.weight" in one_line(e)


def test_unexpected_tensor_is_refused_not_ignored(tmp_path, tok_meta):
    path = tmp_path / "bias.gguf"
    write_llama_gguf(path, tok_meta, n_layer=1, extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(path)
    assert "blk.0.attn_q.bias" in one_line(e)


def test_shape_disagreeing_with_metadata_is_named(tmp_path, tok_meta):
    path = tmp_path / "shape.gguf"
    write_llama_gguf(path, tok_meta, n_layer=1, n_ff=96, meta_n_ff=128)
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(path)
    assert "blk.0.ffn_gate.weight" in one_line(e) and "(96, 64)" in str(e.value) and "(128, 64)" in str(e.value)


def test_bad_head_counts_and_rope_scaling_are_named(tmp_path, tok_meta):
    path = tmp_path / "heads.gguf"
    write_llama_gguf(path, tok_meta, n_layer=1, n_head=4, n_kv_head=3)
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(path)
    assert "llama.attention.head_count_kv" in one_line(e)
    path = tmp_path / "yarn.gguf"
    write_llama_gguf(path, tok_meta, n_layer=1, extra_kv={"llama.rope.scaling.type": "yarn",
                                                          "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ModelLoadError) as e:
        load_gguf_model(path)
    assert "llama.rope.scaling.type" in one_line(e) and "yarn" in str(e.value)


def test_linear_rope_scaling_divides_positions(tmp_path, tok_meta):
    path = tmp_path / "linear.gguf"
    write_llama_gguf(path, tok_meta, n_layer=1, extra_kv={"llama.rope.scaling.type": "linear",
                                                          "llama.rope.scaling.factor": 4.0})
    model, _ = load_gguf_model(path)
    plain, _ = load_gguf_model(synthetic_plain(tmp_path, tok_meta))
    cos4, _ = model.rope.rows(np.array([8]))
    cos1, _ = plain.rope.rows(np.array([2]))
    assert np.allclose(cos4, cos1, atol=1e-6)


def synthetic_plain(tmp_path, tok_meta):
    path = tmp_path / "plain.gguf"
    write_llama_gguf(path, tok_meta, n_layer=1)
    return path
