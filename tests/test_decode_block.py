"""The fused decode block (kernels.ops.decode_block, one C call per block in a decode step) against the
same block run as its kernels.ops calls one by one: bit-identical logits and KV caches, step after step,
for batches of sequences at different positions, on the real SmolLM2 (fused Q4_1 Q/K/V and gate/up) and
on synthetic files holding every other kernel kind (Q8_0, F16, F32, Q4_0/Q4_1, Q5_0/Q5_1 unfused;
Q4_K/Q5_K/Q6_K rewritten), in both numerics (float32 and float16 caches), and on GPT-2 (LayerNorm,
Conv1D biases, no rotary, gelu_new; packed float32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llorch_cpud import kernels
from llorch_cpud.engine import Engine, Request
from llorch_cpud.formats import load_model
from llorch_cpud.models import base
from llorch_cpud.sampling import SamplingParams

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from make_llama_gguf import TOKENIZER_KEYS, write_llama_gguf  # noqa: E402 (scripts/)

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="C kernels not built")


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_gguf):
    from llorch_cpud.formats.gguf import GGUFFile

    f = GGUFFile.open(smollm2_gguf)
    tok_meta = {k: f.metadata[k] for k in TOKENIZER_KEYS}
    d = tmp_path_factory.mktemp("fused")
    k4, k5, k6 = QT.Q4_K, QT.Q5_K, QT.Q6_K
    kquant = {"attn_q": k4, "attn_k": k6, "attn_v": k5, "attn_output": k6, "ffn_gate": k4, "ffn_up": k5,
              "ffn_down": k4, "token_embd": k6, "output": k4}
    write_llama_gguf(d / "mixed.gguf", tok_meta, n_head=4, n_kv_head=2, seed=3)
    write_llama_gguf(d / "mqa.gguf", tok_meta, n_embd=96, n_head=4, n_kv_head=1, n_ff=128, seed=4, tied=False)
    write_llama_gguf(d / "kquant.gguf", tok_meta, n_layer=2, n_embd=256, n_head=4, n_kv_head=2, n_ff=512,
                     tied=False, types=kquant)
    return {"smollm2": smollm2_gguf, "mixed": d / "mixed.gguf", "mqa": d / "mqa.gguf", "kquant": d / "kquant.gguf"}


def run_steps(engine, path: str, n_steps: int = 5, traces: list | None = None):
    """Three sequences of different prompt lengths, prefilled, then decoded together on the model's decode
    `path`; every decode step's logits and, at the end, every cache. `traces`: a list that receives each decode
    step's trace (the step is then traced)."""
    engine = Engine(engine.model.with_path(path), engine.tokenizer)
    engine.eos_token_id = None
    seqs = [engine.start(Request(prompt=p, max_tokens=n_steps + 3, sampling=SamplingParams(temperature=0.0), seed=0))
            for p in ("Hello", "The quick brown fox jumps over", "1, 2, 3,")]
    for s in seqs:
        s.keep_logits = True
    engine.step(seqs)  # the prefill (numpy stage functions either way)
    logits = []
    for _ in range(n_steps):
        trace = {} if traces is not None else None
        engine.step(seqs, trace)
        if traces is not None:
            traces.append(trace)
        logits.append(np.stack([s.last_logits for s in seqs]))
    return logits, [(s.cache.k.copy(), s.cache.v.copy()) for s in seqs]


@pytest.mark.parametrize("name", ["smollm2", "mixed", "mqa", "kquant"])
@pytest.mark.parametrize("numerics", ["float32", "q8"])
def test_fused_block_is_bit_identical_to_the_ops_path(models, name, numerics, monkeypatch):
    model, tok, _ = load_model(str(models[name]), numerics=numerics)
    engine = Engine(model, tok)
    engine.eos_token_id = None
    check_fused_equals_ops(engine, model.config.n_layer, monkeypatch)


def check_fused_equals_ops(engine, n_layer, monkeypatch):
    calls = []
    fused_call = kernels.ops.DecodeBlock.__call__  # each block's prepared decode kernel
    monkeypatch.setattr(kernels.ops.DecodeBlock, "__call__", lambda *a, **k: calls.append(1) or fused_call(*a, **k))
    fused_logits, fused_caches = run_steps(engine, "fused")
    assert len(calls) == 5 * n_layer  # every block of every decode step took the fused call
    ops_logits, ops_caches = run_steps(engine, "stages")
    assert len(calls) == 5 * n_layer
    assert_same_steps((fused_logits, fused_caches), (ops_logits, ops_caches))
    # traced: the same numbers (the C block copies its stage tensors out), and the fused block's stage tensors
    # are the stage path's, bit for bit
    fused_traces, ops_traces = [], []
    assert_same_steps(run_steps(engine, "fused", traces=fused_traces), (fused_logits, fused_caches))
    assert_same_steps(run_steps(engine, "stages", traces=ops_traces), (fused_logits, fused_caches))
    names = {"block_in", "ln_1", "q", "k", "v", "scores", "attn_out", "ln_2", "ffn_out", "block_out"}
    for tf, to in zip(fused_traces, ops_traces):
        assert set(tf) == set(to) == names
        for name in names - {"scores"}:
            np.testing.assert_array_equal(tf[name], to[name], err_msg=name)
        assert len(tf["scores"]) == 3
        for sf, so in zip(tf["scores"], to["scores"]):
            assert sf.shape[:2] == (sf.shape[0], 1) and np.isfinite(sf).all()
            np.testing.assert_array_equal(sf, so)


def assert_same_steps(a, b):
    (la, ca), (lb, cb) = a, b
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)
    for (ka, va), (kb, vb) in zip(ca, cb):
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)


def test_fused_gpt2_block_is_bit_identical_to_the_ops_path(gpt2_small, monkeypatch):
    model, tok, _ = load_model(str(gpt2_small))
    engine = Engine(model, tok)
    engine.eos_token_id = None
    check_fused_equals_ops(engine, model.config.n_layer, monkeypatch)


def test_fused_gpt2_block_takes_its_biases_seriously(gpt2_small):
    """Negative controls: each bias, and the LayerNorm's, changes the result; a wrong-length bias is refused."""
    from llorch_cpud.models import gpt2

    model, _, _ = load_model(str(gpt2_small))
    b, cfg = model.weights.blocks[0], model.config
    x = np.random.default_rng(0).standard_normal((2, cfg.n_embd)).astype(np.float32)
    segments = [base.Segment(start=0, length=1, cache=model.new_cache(4)) for _ in range(2)]
    base_out = gpt2.decode_block(x, b, 0, cfg, segments)
    assert np.isfinite(base_out).all() and not np.array_equal(base_out, x)
    for name in ("ln_1_bias", "attn_c_attn_bias", "attn_c_proj_bias", "ln_2_bias", "mlp_c_fc_bias", "mlp_c_proj_bias"):
        changed = dataclasses.replace(b, **{name: getattr(b, name) + np.float32(0.5)})
        assert not np.array_equal(gpt2.decode_block(x, changed, 0, cfg, segments), base_out), name
    short = dataclasses.replace(b, mlp_c_fc_bias=b.mlp_c_fc_bias[:-1])
    with pytest.raises(ValueError, match="up bias"):
        gpt2.decode_block(x, short, 0, cfg, segments)


def test_fused_block_takes_its_arguments_seriously(models):
    """Negative controls: a different eps or layer changes the result; a wrong cache is refused by name."""
    model, tok, _ = load_model(str(models["mixed"]))
    cfg = model.config
    cache = model.new_cache(8)
    x = np.random.default_rng(0).standard_normal((1, cfg.n_embd)).astype(np.float32)
    cos, sin = model.rope.rows(np.array([0]))

    def run(eps=cfg.rms_norm_eps, layer=0, caches=None):
        b = model.weights.blocks[layer]
        return kernels.ops.decode_block(
            x, b.attn_norm_weight, [b.attn_q_weight, b.attn_k_weight, b.attn_v_weight], b.attn_output_weight,
            b.ffn_norm_weight, [b.ffn_gate_weight, b.ffn_up_weight], b.ffn_down_weight, cos, sin, caches or [cache], [1], layer, cfg.n_head, cfg.n_kv_head,
            cfg.head_dim, eps)

    base = run()
    assert np.isfinite(base).all() and not np.array_equal(base, x)
    assert not np.array_equal(run(eps=1e-2), base)
    assert not np.array_equal(run(layer=1), base)
    bad = model.new_cache(8)
    bad.k = bad.k[:, :1].copy()  # one KV head where the model has two
    with pytest.raises(ValueError, match="sequence 0: a cache"):
        run(caches=[bad])
