"""Negative controls: known bugs injected into our own engine, to prove the checkpoints can fail.

Each bug replaces one stage function (or weight) of the running engine for the duration of a
`with inject(name, model):` block, so the validator exercises exactly the code the engine
runs. `expected` is the first checkpoint that must catch it.

Bugs belong to a model family (`Bug.family`): `BUGS` holds GPT-2's (models/gpt2.py),
`LLAMA_BUGS` the Llama family's (models/llama.py); `bugs_for(family)` picks the table and
`inject` looks the name up in the table of the model it is given.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import llorch_cpud.models.gpt2 as gpt2
import llorch_cpud.models.llama as llama
import llorch_cpud.sampling as sampling
from llorch_cpud.kernels import KernelMatrix, PackedMatrix, linear
from llorch_cpud.models.base import trace_put


@dataclass(frozen=True)
class Bug:
    name: str
    description: str
    expected: int  # first checkpoint that must fail
    patch: Callable  # (model) -> list of (object, attribute, replacement)
    family: str = "gpt2"


def _ln_wrong_eps(x, weight, bias, eps):
    return _orig["layer_norm"](x, weight, bias, 1e-3)


def _ln_unbiased(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, ddof=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu_erf(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float32])(x / math.sqrt(2.0)))


def _attn_out_transposed(m):  # every block's attn.c_proj weight replaced by its transpose
    names = [f"h.{i}.attn.c_proj.weight" for i in range(m.config.n_layer)]
    return [(*m.tensor_slot(n), np.ascontiguousarray(m.dense(n).T)) for n in names]


def _numpy_path(m):
    """The model switched to the numpy path for the bug's duration: the bug replaces a stage function that only
    that path runs in production (on the C paths the attention kernel writes the K/V rows of prefill and decode
    alike; its own faults are KERNEL_FAULTS, e.g. KV_SLOT_PAST_40)."""
    return [(m, "path", "numpy")]


def _cache_write_off_by_one(cache, layer, start, k, v):
    return _orig["cache_write"](cache, layer, start + 1, k, v)


def _scores_wrong_scale(q, k, start):
    return _orig["attention_scores"](q, k, start) * math.sqrt(q.shape[-1]) / q.shape[-1]


def _scores_no_mask(q, k, start):
    head_dim = q.shape[-1]
    return q.transpose(1, 0, 2) @ k.transpose(0, 2, 1) / math.sqrt(head_dim)


def _block_no_attn_residual(x, b, i, cfg, segments, path="numpy", trace=None):
    trace_put(trace, i, "block_in", x)
    h = gpt2.layer_norm(x, b.ln_1_weight, b.ln_1_bias, cfg.layer_norm_epsilon)
    trace_put(trace, i, "ln_1", h)
    x = gpt2.attention(h, b, i, cfg, segments, path, trace)  # the residual `x +` is dropped
    h = gpt2.layer_norm(x, b.ln_2_weight, b.ln_2_bias, cfg.layer_norm_epsilon)
    trace_put(trace, i, "ln_2", h)
    f = gpt2.ffn(h, b.mlp_c_fc_weight, b.mlp_c_fc_bias, b.mlp_c_proj_weight, b.mlp_c_proj_bias)
    trace_put(trace, i, "ffn_out", f)
    trace_put(trace, i, "block_out", x + f)
    return x + f


def _lm_head_no_final_norm(x, w, cfg):
    return linear(x, w.wte_weight)


def _argmax_second(logits):
    return int(np.argsort(logits)[-2])


class _ScreenSecondBest:
    """A head screen whose greedy pick is the second-best row (the served greedy step's own argmax bug)."""

    def __init__(self, head):
        self.head = head

    def argmax(self, h):
        return np.argsort(linear(h, self.head), axis=1)[:, -2]  # [rows, vocab] -> [rows]


def _softmax_ignores_temperature(logits, temperature):
    return _orig["softmax_probs"](logits, 1.0)


def _ffn_bias_dropped(x, c_fc_weight, c_fc_bias, c_proj_weight, c_proj_bias, fast=False):
    return gpt2.conv1d(gpt2.gelu_new(gpt2.conv1d(x, c_fc_weight, c_fc_bias)), c_proj_weight, np.float32(0))


_orig = {
    "layer_norm": gpt2.layer_norm,
    "cache_write": gpt2.cache_write,
    "attention_scores": gpt2.attention_scores,
    "softmax_probs": sampling.softmax_probs,
}


BUGS = {
    b.name: b
    for b in [
        Bug("wrong_epsilon", "LayerNorm eps 1e-3 instead of 1e-5", 1, lambda m: [(gpt2, "layer_norm", _ln_wrong_eps)]),
        Bug("unbiased_variance", "LayerNorm with the unbiased (n-1) variance", 1,
            lambda m: [(gpt2, "layer_norm", _ln_unbiased)]),
        Bug("transposed_qkv_weight", "c_attn weight used transposed (read as [out, in] and reshaped)", 2,
            lambda m: [(*m.tensor_slot("h.0.attn.c_attn.weight"),
                        np.ascontiguousarray(m.dense("h.0.attn.c_attn.weight").T).reshape(m.dense("h.0.attn.c_attn.weight").shape))]),
        Bug("kv_cache_off_by_one", "KV cache written one position late (numpy path)", 3,
            lambda m: [(gpt2, "cache_write", _cache_write_off_by_one), *_numpy_path(m)]),
        Bug("wrong_attention_scale", "scores scaled by 1/head_dim instead of 1/sqrt(head_dim)", 4,
            lambda m: [(gpt2, "attention_scores", _scores_wrong_scale)]),
        Bug("no_causal_mask", "attention without the causal mask", 4, lambda m: [(gpt2, "attention_scores", _scores_no_mask)]),
        Bug("transposed_c_proj", "attention output projection weight transposed", 5,
            _attn_out_transposed),
        Bug("erf_gelu", "exact erf GELU instead of GPT-2's tanh approximation", 6, lambda m: [(gpt2, "gelu_new", _gelu_erf)]),
        Bug("ffn_bias_dropped", "FFN down-projection bias dropped", 6, lambda m: [(gpt2, "ffn", _ffn_bias_dropped)]),
        Bug("dropped_residual", "attention residual connection dropped", 7,
            lambda m: [(gpt2, "block", _block_no_attn_residual)]),
        Bug("no_final_norm", "final LayerNorm skipped before the LM head", 8,
            lambda m: [(gpt2, "lm_head", _lm_head_no_final_norm)]),
        Bug("argmax_second_best", "greedy picks the second-best token", 10,
            lambda m: [(sampling, "argmax", _argmax_second)]),
        Bug("screen_second_best", "the greedy step's head screen picks the second-best token", 10,
            lambda m: [(m, "head_screen", _ScreenSecondBest(m.weights.wte_weight))]),
        Bug("softmax_ignores_temperature", "softmax(logits) instead of softmax(logits / T)", 11,
            lambda m: [(sampling, "softmax_probs", _softmax_ignores_temperature)]),
    ]
}


# ---------------------------------------------------------------- Llama family (models/llama.py)


def _rms_wrong_eps(x, weight, eps):
    return _orig["llama.rms_norm"](x, weight, 1e-6)


def _rms_subtracts_mean(x, weight, eps):  # LayerNorm without bias where RMSNorm belongs
    return _orig["llama.rms_norm"](x - x.mean(axis=-1, keepdims=True), weight, eps)


def _rope_interleaved(x, cos, sin):  # llama.cpp's adjacent-pair rotation applied to HF-layout rows
    x2 = x.reshape(*x.shape[:-1], -1, 2)
    rot = np.stack([-x2[..., 1], x2[..., 0]], axis=-1).reshape(x.shape)
    c = cos[:, : cos.shape[-1] // 2].repeat(2, axis=-1)[:, None, :]  # angle i on lanes 2i, 2i+1
    s = sin[:, : sin.shape[-1] // 2].repeat(2, axis=-1)[:, None, :]
    return x * c + rot * s


def _rope_wrong_base(m):
    c = m.config
    wrong = 10000.0 if c.rope_base != 10000.0 else 500000.0  # the classic default, unless it is the right one
    return [(m, "rope", llama.RopeTables(c.head_dim, wrong, 64, c.rope_linear_factor))]


def _qk_left_permuted(m):  # Q/K rows kept in llama.cpp's GGUF order (the un-permutation forgotten)
    out = []
    for name, order in m.qk_row_order.items():
        out.append((*m.tensor_slot(name), np.ascontiguousarray(m.dense(name)[np.argsort(order)])))
    return out


def _repeat_kv_modulo(k, n_head):  # kv head h % n_kv for query head h, instead of h // group
    return k[np.arange(n_head) % k.shape[0]]


def _scores_gqa_modulo(q, k, start):
    return _orig["llama.attention_scores"](q, _repeat_kv_modulo(k, q.shape[1]), start)


def _attn_heads_gqa_modulo(scores, v):
    return _orig["llama.attention_heads"](scores, _repeat_kv_modulo(v, scores.shape[0]))


def _llama_scores_no_mask(q, k, start):
    return _orig["llama.attention_scores"](q, k, k.shape[1])  # as if the queries came after every key


def _llama_scores_wrong_scale(q, k, start):
    return _orig["llama.attention_scores"](q, k, start) * math.sqrt(q.shape[-1]) / q.shape[-1]


def _llama_cache_write_off_by_one(cache, layer, start, k, v):
    return _orig["llama.cache_write"](cache, layer, start + 1, k, v)


def _llama_o_proj_transposed(m):  # every block's attn_output weight replaced by its transpose
    names = [f"blk.{i}.attn_output.weight" for i in range(m.config.n_layer)]
    return [(*m.tensor_slot(n), np.ascontiguousarray(m.dense(n).T)) for n in names]


def _swiglu_swapped(x, gate_weight, up_weight, down_weight, fast=False):
    return _orig["llama.ffn"](x, up_weight, gate_weight, down_weight, fast)


def _silu_as_gelu(x):
    return gpt2.gelu_new(x)


def _llama_block_no_attn_residual(x, b, i, cfg, segments, cos, sin, path="numpy", trace=None):
    trace_put(trace, i, "block_in", x)
    h = llama.rms_norm(x, b.attn_norm_weight, cfg.rms_norm_eps)
    trace_put(trace, i, "ln_1", h)
    x = llama.attention(h, b, i, cfg, segments, cos, sin, path, trace)  # the residual `x +` is dropped
    h = llama.rms_norm(x, b.ffn_norm_weight, cfg.rms_norm_eps)
    trace_put(trace, i, "ln_2", h)
    f = llama.ffn(h, b.ffn_gate_weight, b.ffn_up_weight, b.ffn_down_weight)
    trace_put(trace, i, "ffn_out", f)
    trace_put(trace, i, "block_out", x + f)
    return x + f


def _llama_lm_head_no_final_norm(x, w, cfg):
    return linear(x, w.head)


def _rope_positions(m, moved):
    """Every forward's RoPE positions replaced by moved(positions, segments)."""
    model_cls_forward = type(m).forward

    def forward(tokens, segments, trace=None):
        rope = m.rope

        class Moved:
            def rows(self, positions):
                return rope.rows(moved(positions, segments))

        m.rope = Moved()
        try:
            return model_cls_forward(m, tokens, segments, trace)
        finally:
            m.rope = rope

    return [(m, "forward", forward)]


def _rope_positions_restart(m):
    """RoPE positions counted from 0 in every forward call (the cache offset ignored): prefill is right,
    every decode step is rotated as position 0."""
    return _rope_positions(m, lambda pos, segs: pos - np.concatenate([np.full(s.length, s.start) for s in segs]))


def _rope_decode_plus_one(m):
    """Decode steps (every segment one row) rotated one position late; prefill is right."""
    return _rope_positions(m, lambda pos, segs: pos + 1 if all(s.length == 1 for s in segs) else pos)


_orig.update({
    "llama.rms_norm": llama.rms_norm,
    "llama.attention_scores": llama.attention_scores,
    "llama.attention_heads": llama.attention_heads,
    "llama.cache_write": llama.cache_write,
    "llama.ffn": llama.ffn,
})


def _L(name, description, expected, patch):
    return Bug(name, description, expected, patch, family="llama")


LLAMA_BUGS = {
    b.name: b
    for b in [
        _L("wrong_epsilon", "RMSNorm eps 1e-6 instead of the file's 1e-5", 1, lambda m: [(llama, "rms_norm", _rms_wrong_eps)]),
        _L("rmsnorm_subtracts_mean", "RMSNorm centred like a LayerNorm (mean subtracted)", 1,
           lambda m: [(llama, "rms_norm", _rms_subtracts_mean)]),
        _L("rope_interleaved", "RoPE rotating adjacent pairs (llama.cpp NORM layout) on HF-layout Q/K", 2,
           lambda m: [(llama, "apply_rope", _rope_interleaved)]),
        _L("rope_wrong_base", "RoPE base 10000 instead of the file's freq_base (500000 if that is 10000)", 2, _rope_wrong_base),
        _L("qk_not_unpermuted", "attn_q/attn_k rows left in GGUF order with half-rotation RoPE", 2, _qk_left_permuted),
        _L("kv_cache_off_by_one", "KV cache written one position late (numpy path)", 3,
           lambda m: [(llama, "cache_write", _llama_cache_write_off_by_one), *_numpy_path(m)]),
        _L("rope_ignores_cache_offset", "decode steps rotated as position 0 (cache offset ignored)", 2,
           _rope_positions_restart),
        _L("rope_decode_plus_one", "decode steps rotated one position late", 2, _rope_decode_plus_one),
        _L("gqa_modulo_heads", "query head h reads KV head h % n_kv instead of h // group", 4,
           lambda m: [(llama, "attention_scores", _scores_gqa_modulo), (llama, "attention_heads", _attn_heads_gqa_modulo)]),
        _L("wrong_attention_scale", "scores scaled by 1/head_dim instead of 1/sqrt(head_dim)", 4,
           lambda m: [(llama, "attention_scores", _llama_scores_wrong_scale)]),
        _L("no_causal_mask", "attention without the causal mask", 4,
           lambda m: [(llama, "attention_scores", _llama_scores_no_mask)]),
        _L("transposed_o_proj", "attention output projection weight transposed", 5, _llama_o_proj_transposed),
        _L("swiglu_gate_up_swapped", "SwiGLU with gate and up projections swapped", 6,
           lambda m: [(llama, "ffn", _swiglu_swapped)]),
        _L("gelu_instead_of_silu", "GELU (tanh) as the gate activation instead of SiLU", 6,
           lambda m: [(llama, "silu", _silu_as_gelu)]),
        _L("dropped_residual", "attention residual connection dropped", 7,
           lambda m: [(llama, "block", _llama_block_no_attn_residual)]),
        _L("no_final_norm", "final RMSNorm skipped before the LM head", 8,
           lambda m: [(llama, "lm_head", _llama_lm_head_no_final_norm)]),
        _L("argmax_second_best", "greedy picks the second-best token", 10,
           lambda m: [(sampling, "argmax", _argmax_second)]),
        _L("softmax_ignores_temperature", "softmax(logits) instead of softmax(logits / T)", 11,
           lambda m: [(sampling, "softmax_probs", _softmax_ignores_temperature)]),
    ]
}



@dataclass(frozen=True)
class KernelFault:
    """A fault compiled into a test build of the C kernels (qkernels.c, -DLLORCH_FAULT=FAULT_<NAME>; the builds pip
    makes have none): it breaks one stage of the code that serves tokens, which `validate` must catch first at
    checkpoint `expected` (scripts/kernel_faults.py builds one and runs validate; tests/test_kernel_faults.py)."""

    name: str
    description: str
    expected: int
    families: tuple[str, ...] = ("llama",)  # where the faulty code runs
    numerics: tuple[str, ...] = ("float32",)  # the modes it is checked in


KERNEL_FAULTS = {
    f.name: f
    for f in [
        KernelFault("ATTN_RESIDUAL", "fused block: attention output added to the residual x 0.99", 7, ("llama", "gpt2")),
        KernelFault("FFN_RESIDUAL", "fused block: FFN output added to the residual x 0.99", 7, ("gpt2",)),
        KernelFault("NORM_EPS", "C norms (decode steps): epsilon 1e-3", 1, ("llama", "gpt2")),
        KernelFault("ROPE_SIN", "C rotary: the first half rotated with +sin instead of -sin", 2),
        KernelFault("SILU_SLOPE", "C SiLU: sigmoid(1.01 x)", 6),
        KernelFault("GELU_SLOPE", "C gelu_new: tanh argument x 1.01", 6, ("gpt2",)),
        KernelFault("ATTN_SCALE", "C decode attention: scale x 1.02", 4, ("llama", "gpt2"), ("float32", "q8")),
        KernelFault("ROW_TILE_DROP_BLOCK", "Q4_1 product tiles (the one-row tile too): each row's last block dropped", 2),
        KernelFault("Q8_DROP_BLOCK", "q8 Q4_1 product tiles (the one-row tile too): each row's last block dropped", 2,
                    ("llama",), ("q8",)),
        KernelFault("BATCH_OTHER_CACHE", "C decode attention: row b >= 1 reads sequence b-1's cache", 4),
        KernelFault("KV_SLOT_PAST_40", "C decode attention: K/V of positions >= 40 written one slot late", 3,
                    ("llama",), ("float32", "q8")),
        KernelFault("ATTN_BLOCK_OFF_BY_ONE", "C decode attention: the last partial 16-position block misses a position",
                    4, ("gpt2",)),
        KernelFault("SOFTMAX_SUM", "C decode attention: softmax denominators x 1.02", 5),
    ]
}

_MISSING = object()
BUGS_BY_FAMILY = {"gpt2": BUGS, "llama": LLAMA_BUGS}


def bugs_for(family: str) -> dict[str, Bug]:
    """The negative controls of one model family (an empty dict for a family without any)."""
    return BUGS_BY_FAMILY.get(family, {})


def _held_like(old, new, family: str):
    """A replacement weight held as the model holds the one it replaces: a numpy matrix for a kernel-held one
    is packed for the kernels (its products the same), so the model keeps running the path it was built with.
    The bugs give matrices as the math reads them: GPT-2's Conv1D [in, out] (`x @ W`), Llama's [out, in]."""
    if not (isinstance(old, KernelMatrix) and isinstance(new, np.ndarray) and new.ndim == 2):
        return new
    return PackedMatrix.from_dense(np.ascontiguousarray(new.T if family == "gpt2" else new, dtype=np.float32))


@contextlib.contextmanager
def inject(name: str, model):
    """Apply a bug (looked up in the table of the model's family) to the running model; undo it on exit."""
    table = bugs_for(model.family)
    if name not in table:
        raise KeyError(f"no negative control {name!r} for family {model.family!r}")
    bug = table[name]
    patches = bug.patch(model)
    saved = []
    for obj, attr, new in patches:
        # an attribute the object did not hold itself (a method) is deleted again, not pinned
        old = getattr(obj, attr) if attr in getattr(obj, "__dict__", {attr: 0}) else _MISSING
        saved.append((obj, attr, old))
        setattr(obj, attr, _held_like(old, new, model.family))
    try:
        yield bug
    finally:
        for obj, attr, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
