"""Negative controls: known bugs injected into our own engine, to prove the checkpoints can fail.

Each bug replaces one stage function (or weight) of the running engine for the duration of a
`with inject(name, model):` block, so the validator exercises exactly the code the engine
runs. `expected` is the first checkpoint that must catch it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import llorch_cpud.models.gpt2 as gpt2
import llorch_cpud.sampling as sampling


@dataclass(frozen=True)
class Bug:
    name: str
    description: str
    expected: int  # first checkpoint that must fail
    patch: Callable  # (model) -> list of (object, attribute, replacement)


def _ln_wrong_eps(x, weight, bias, eps):
    return _orig["layer_norm"](x, weight, bias, 1e-3)


def _ln_unbiased(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, ddof=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu_erf(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float32])(x / math.sqrt(2.0)))


def _attn_out_transposed(scores, v, c_proj_weight, c_proj_bias):
    return _orig["attention_output"](scores, v, c_proj_weight.T, c_proj_bias)


def _cache_write_off_by_one(cache, layer, start, k, v):
    return _orig["cache_write"](cache, layer, start + 1, k, v)


def _scores_wrong_scale(q, k, start):
    return _orig["attention_scores"](q, k, start) * math.sqrt(q.shape[-1]) / q.shape[-1]


def _scores_no_mask(q, k, start):
    head_dim = q.shape[-1]
    return q.transpose(1, 0, 2) @ k.transpose(0, 2, 1) / math.sqrt(head_dim)


def _block_no_attn_residual(x, w, i, cfg, segments, trace=None):
    p = f"h.{i}."
    h = gpt2.layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.layer_norm_epsilon)
    x = gpt2.attention(h, w, i, cfg, segments, trace)  # the residual `x +` is dropped
    h = gpt2.layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], cfg.layer_norm_epsilon)
    return x + gpt2.ffn(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"], w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])


def _lm_head_no_final_norm(x, w, cfg):
    return x @ w["wte.weight"].T


def _argmax_second(logits):
    return int(np.argsort(logits)[-2])


def _softmax_ignores_temperature(logits, temperature):
    return _orig["softmax_probs"](logits, 1.0)


def _ffn_bias_dropped(x, c_fc_weight, c_fc_bias, c_proj_weight, c_proj_bias):
    return gpt2.gelu_new(x @ c_fc_weight + c_fc_bias) @ c_proj_weight


_orig = {
    "layer_norm": gpt2.layer_norm,
    "attention_output": gpt2.attention_output,
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
            lambda m: [(m.weights, "h.0.attn.c_attn.weight",
                        np.ascontiguousarray(m.weights["h.0.attn.c_attn.weight"].T).reshape(m.weights["h.0.attn.c_attn.weight"].shape))]),
        Bug("kv_cache_off_by_one", "KV cache written one position late", 3,
            lambda m: [(gpt2, "cache_write", _cache_write_off_by_one)]),
        Bug("wrong_attention_scale", "scores scaled by 1/head_dim instead of 1/sqrt(head_dim)", 4,
            lambda m: [(gpt2, "attention_scores", _scores_wrong_scale)]),
        Bug("no_causal_mask", "attention without the causal mask", 4, lambda m: [(gpt2, "attention_scores", _scores_no_mask)]),
        Bug("transposed_c_proj", "attention output projection weight transposed", 5,
            lambda m: [(gpt2, "attention_output", _attn_out_transposed)]),
        Bug("erf_gelu", "exact erf GELU instead of GPT-2's tanh approximation", 6, lambda m: [(gpt2, "gelu_new", _gelu_erf)]),
        Bug("ffn_bias_dropped", "FFN down-projection bias dropped", 6, lambda m: [(gpt2, "ffn", _ffn_bias_dropped)]),
        Bug("dropped_residual", "attention residual connection dropped", 7,
            lambda m: [(gpt2, "block", _block_no_attn_residual)]),
        Bug("no_final_norm", "final LayerNorm skipped before the LM head", 8,
            lambda m: [(gpt2, "lm_head", _lm_head_no_final_norm)]),
        Bug("argmax_second_best", "greedy picks the second-best token", 10,
            lambda m: [(sampling, "argmax", _argmax_second)]),
        Bug("softmax_ignores_temperature", "softmax(logits) instead of softmax(logits / T)", 11,
            lambda m: [(sampling, "softmax_probs", _softmax_ignores_temperature)]),
    ]
}


@contextlib.contextmanager
def inject(name: str, model):
    """Apply a bug to the running model and its stage functions; undo it on exit."""
    bug = BUGS[name]
    patches = bug.patch(model)
    saved = []
    for obj, attr, new in patches:
        if isinstance(obj, dict):
            saved.append((obj, attr, obj[attr]))
            obj[attr] = new
        else:
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, new)
    try:
        yield bug
    finally:
        for obj, attr, old in reversed(saved):
            if isinstance(obj, dict):
                obj[attr] = old
            else:
                setattr(obj, attr, old)
