"""GPT-2 in numpy: one small pure function per checkpoint stage, composed into a forward pass.

Weights are named exactly as in the Hugging Face checkpoint (`h.0.attn.c_attn.weight`, ...).
Conv1D weights are [in, out], so a projection is `x @ W + b` - written `conv1d(x, W, b)`, because
with the C kernels built the loader packs each W (as Wᵀ, `kernels.PackedMatrix`) for a kernel that
reads the weights once per batched decode step (see kernels/packed.py). `GPT2.dense(name)` is any
weight as the checkpoint's float32 array.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np

from llorch_cpud import kernels
from llorch_cpud.cache import KVCache, cache_read, cache_write
from llorch_cpud.errors import ModelLoadError
from llorch_cpud.kernels import PackedMatrix, linear, take_rows
from llorch_cpud.kernels import ops
from llorch_cpud.kernels.screen import HeadScreen
from llorch_cpud.models.base import (Segment, attend_segments, choose_path, step_path, trace_decode_block,
                                     trace_put)


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # FFN width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "GPT2Config":
        """The fields this model reads from a Hugging Face config, each checked for its type and a sane
        range (ModelLoadError naming `source` and the field): an absurd value fails here, before anything
        is allocated for it."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        for name, value in {**values, **{k: d[k] for k in CHECKED_ONLY if k in d}}.items():
            kind, lo, hi = CONFIG_RULES.get(name) or CHECKED_ONLY[name]
            if value is None and name in OPTIONAL_FIELDS:
                continue
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if ok and lo is not None:
                ok = lo <= value <= hi if kind is int else lo < value < hi  # (a NaN fails)
            if not ok:
                rule = {int: f"an integer in [{lo}, {hi}]", float: f"a number in ({lo}, {hi})", bool: "true or false",
                        str: "a string"}[kind if kind in (int, bool, str) else float]
                raise ModelLoadError(f"{source}: {name} must be {rule}, got {value!r:.80}")
        return cls(**values)


OPTIONAL_FIELDS = ("n_inner", "bos_token_id", "eos_token_id")
CONFIG_RULES = {  # field -> (type, low, high): bounds far beyond any GPT-2, far below a runaway allocation
    "vocab_size": (int, 1, 1 << 22),
    "n_positions": (int, 1, 1 << 20),
    "n_embd": (int, 1, 1 << 16),
    "n_layer": (int, 1, 1024),
    "n_head": (int, 1, 1 << 12),
    "n_inner": (int, 1, 1 << 18),
    "layer_norm_epsilon": ((int, float), 0.0, 1.0),
    "activation_function": (str, None, None),
    "scale_attn_weights": (bool, None, None),
    "bos_token_id": (int, 0, 1 << 22),
    "eos_token_id": (int, 0, 1 << 22),
}
#: Fields this model does not read but other GPT-2 code does (n_ctx: the legacy name of the context length):
#: checked the same way, so a config that is absurd to them is refused here too.
CHECKED_ONLY = {"n_ctx": (int, 1, 1 << 20)}


# ---------------------------------------------------------------- stage functions


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Checkpoint 1. LayerNorm over the last axis with the biased variance."""
    n = x.shape[-1]  # the float32 sums and divisions of np.mean, without its Python wrapper (a decode step runs 25)
    mean = np.add.reduce(x, axis=-1, keepdims=True) / n  # [rows, n_embd] -> [rows, 1]
    xc = x - mean  # [rows, n_embd]
    var = np.add.reduce(np.square(xc), axis=-1, keepdims=True) / n  # [rows, n_embd] -> [rows, 1]
    return xc / np.sqrt(var + eps) * weight + bias  # [rows, n_embd]


def conv1d(x: np.ndarray, weight, bias: np.ndarray) -> np.ndarray:
    """Hugging Face Conv1D: x @ W + b with W [in, out] (a PackedMatrix holds Wᵀ: the same product)."""
    y = weight.matmul(x) if isinstance(weight, PackedMatrix) else x @ weight  # [rows, in] -> [rows, out]
    return y + bias


def conv1d_weight(weight) -> np.ndarray:
    """A Conv1D weight as the checkpoint's [in, out] float32 array, packed or not."""
    return weight.dequantize().T if isinstance(weight, PackedMatrix) else weight


def qkv_projection(x: np.ndarray, c_attn_weight, c_attn_bias: np.ndarray, n_head: int):
    """Checkpoint 2. Fused QKV projection, split into per-head Q, K, V."""
    rows, n_embd = x.shape
    qkv = conv1d(x, c_attn_weight, c_attn_bias)  # [rows, n_embd] -> [rows, 3*n_embd]
    q, k, v = np.split(qkv, 3, axis=-1)  # 3 × [rows, n_embd]
    head_dim = n_embd // n_head
    return (
        q.reshape(rows, n_head, head_dim),  # [rows, n_head, head_dim]
        k.reshape(rows, n_head, head_dim),  # [rows, n_head, head_dim]
        v.reshape(rows, n_head, head_dim),  # [rows, n_head, head_dim]
    )


def causal_mask(start: int, n: int, total: int) -> np.ndarray:
    """True where query row i (absolute position start+i) must not see key j."""
    return np.arange(total)[None, :] > (start + np.arange(n))[:, None]  # [n, total]


def attention_scores(q: np.ndarray, k: np.ndarray, start: int) -> np.ndarray:
    """Checkpoint 4. Q·Kᵀ/sqrt(head_dim) with the causal mask (masked = -inf), before softmax."""
    n, n_head, head_dim = q.shape  # q: [n, n_head, head_dim]; k: [n_head, T, head_dim]
    total = k.shape[1]
    scores = q.transpose(1, 0, 2) @ k.transpose(0, 2, 1)  # [n_head, n, hd] @ [n_head, hd, T] -> [n_head, n, T]
    scores *= 1.0 / math.sqrt(head_dim)
    if n > 1 or start + n != total:
        scores[:, causal_mask(start, n, total)] = -np.inf  # [n_head, n, T]
    return scores


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # [..., T]
    return e / e.sum(axis=-1, keepdims=True)  # [..., T]


def attention_heads(scores: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax, weighted sum of V, heads merged: [n_head, n, T], [n_head, T, hd] -> [n, n_embd]."""
    n_head, n, _ = scores.shape  # scores: [n_head, n, T]; v: [n_head, T, head_dim]
    weights = softmax(scores)  # [n_head, n, T]
    heads = weights @ v  # [n_head, n, T] @ [n_head, T, hd] -> [n_head, n, hd]
    return heads.transpose(1, 0, 2).reshape(n, -1)  # [n_head, n, hd] -> [n, n_embd]


def attention_output(scores: np.ndarray, v: np.ndarray, c_proj_weight, c_proj_bias: np.ndarray) -> np.ndarray:
    """Checkpoint 5. softmax, weighted sum of V, merge heads, output projection."""
    return conv1d(attention_heads(scores, v), c_proj_weight, c_proj_bias)  # [n, n_embd] -> [n, n_embd]


GELU_C = np.float32(math.sqrt(2.0 / math.pi))
GELU_K = np.float32(0.044715)


def gelu_new(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (GPT-2's `gelu_new`)."""
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + GELU_K * (x * x * x))))  # x*x*x: numpy's float32 x**3 is ~20x slower


def ffn(x, c_fc_weight, c_fc_bias, c_proj_weight, c_proj_bias, fast: bool = False) -> np.ndarray:
    """Checkpoint 6. Up projection, GELU (tanh), down projection. `fast`: the GELU by one C call."""
    h = conv1d(x, c_fc_weight, c_fc_bias)  # [rows, n_embd] -> [rows, n_inner]
    a = ops.gelu_new(h, GELU_C, GELU_K) if fast else gelu_new(h)  # [rows, n_inner]
    return conv1d(a, c_proj_weight, c_proj_bias)  # [rows, n_inner] -> [rows, n_embd]


def attention(x, w: dict, i: int, cfg: GPT2Config, segments: list[Segment], path: str = "numpy",
              trace=None) -> np.ndarray:
    """Self-attention of block i over every segment, writing K/V into each segment's cache (`path`: the model's)."""
    p = f"h.{i}.attn."
    q, k, v = qkv_projection(x, w[p + "c_attn.weight"], w[p + "c_attn.bias"], cfg.n_head)  # 3 × [rows, H, hd]
    trace_put(trace, i, "q", q)
    trace_put(trace, i, "k", k)
    trace_put(trace, i, "v", v)
    merged = np.empty_like(x)  # [rows, n_embd]
    attend_segments(q, k, v, segments, i, merged, path != "numpy", trace, cache_write, cache_read, attention_scores,
                    attention_heads)  # [rows, H·hd]
    out = conv1d(merged, w[p + "c_proj.weight"], w[p + "c_proj.bias"])  # checkpoint 5, every row: [rows, n_embd]
    trace_put(trace, i, "attn_out", out)
    return out


_BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def block(x, w: dict, i: int, cfg: GPT2Config, segments: list[Segment], path: str = "numpy", trace=None) -> np.ndarray:
    """Checkpoint 7. One transformer block: pre-norm attention and FFN, each with its residual. `path`: the
    model's (base.PATHS): fused runs decode steps as one C call, any other step as stages."""
    p = f"h.{i}."
    step = step_path(path, segments)
    if step == "fused":
        return decode_block(x, w, i, cfg, segments, trace)  # [rows, n_embd]
    fast = step == "stages"
    norm = ops.layer_norm if fast else layer_norm
    trace_put(trace, i, "block_in", x)
    h = norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.layer_norm_epsilon)  # [rows, n_embd]
    trace_put(trace, i, "ln_1", h)
    x = x + attention(h, w, i, cfg, segments, path, trace)  # [rows, n_embd]
    h = norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], cfg.layer_norm_epsilon)  # [rows, n_embd]
    trace_put(trace, i, "ln_2", h)
    f = ffn(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"], w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"],
            fast)
    trace_put(trace, i, "ffn_out", f)
    x = x + f  # [rows, n_embd]
    trace_put(trace, i, "block_out", x)
    return x


def decode_block(x, w: dict, i: int, cfg: GPT2Config, segments: list[Segment], trace=None) -> np.ndarray:
    """`block` for a decode step on the fused path (every segment one row, packed weights) as one C call: the
    kernels.ops versions of its stage functions in its order (kernels.ops.decode_block), which copies its
    stage tensors out for a trace."""
    p = f"h.{i}."
    stages = {} if trace is not None and i == 0 else None
    out = ops.decode_block(x, w[p + "ln_1.weight"], [w[p + "attn.c_attn.weight"]], w[p + "attn.c_proj.weight"],
                            w[p + "ln_2.weight"], [w[p + "mlp.c_fc.weight"]], w[p + "mlp.c_proj.weight"], None, None,
                            [s.cache for s in segments], [s.start + 1 for s in segments], i, cfg.n_head, cfg.n_head,
                            cfg.head_dim, cfg.layer_norm_epsilon,
                            norm_biases=(w[p + "ln_1.bias"], w[p + "ln_2.bias"]),
                            biases=(w[p + "attn.c_attn.bias"], w[p + "attn.c_proj.bias"], w[p + "mlp.c_fc.bias"],
                                    w[p + "mlp.c_proj.bias"]),
                            gelu=(GELU_C, GELU_K), trace=stages)  # [B, n_embd] -> [B, n_embd]
    trace_decode_block(trace, i, x, stages, out, segments)
    return out


def embed(w: dict, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Token plus learned absolute position embeddings."""
    return take_rows(w["wte.weight"], tokens) + w["wpe.weight"][positions]  # [rows] -> [rows, n_embd]


def final_norm(x: np.ndarray, w: dict, cfg: GPT2Config) -> np.ndarray:
    """The final LayerNorm, the head's input: [rows, n_embd] -> [rows, n_embd]."""
    return layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], cfg.layer_norm_epsilon)


def lm_head(x: np.ndarray, w: dict, cfg: GPT2Config) -> np.ndarray:
    """Checkpoint 8 (last step). Final LayerNorm, then the tied head: logits = ln_f(x) · wteᵀ."""
    h = final_norm(x, w, cfg)  # [rows, n_embd]
    return linear(h, w["wte.weight"])  # [rows, n_embd] @ [n_embd, vocab] -> [rows, vocab]


# ---------------------------------------------------------------- the model


class GPT2:
    family = "gpt2"
    numerics = "float32"  # how quantized products treat activations (formats.apply_numerics); GPT-2 has none

    def __init__(self, config: GPT2Config, weights: dict[str, np.ndarray], path: str | None = None):
        self.config = config
        self.weights = weights
        self.path = choose_path(path, self._matrices())
        self.n_ctx = config.n_positions
        self.vocab_size = config.vocab_size
        self.eos_token_id = config.eos_token_id
        self.head_screen = HeadScreen.build(weights["wte.weight"])  # greedy picks at half the head's bytes

    def _matrices(self) -> list:
        return [self.weights[f"h.{i}.{n}"] for i in range(self.config.n_layer) for n in _BLOCK_MATRICES]

    def with_path(self, path: str) -> "GPT2":
        """The same model (same weight objects) running decode steps on another path (base.PATHS)."""
        other = copy.copy(self)
        other.path = choose_path(path, self._matrices())
        return other

    @property
    def packed(self) -> bool:
        """Whether the projections are packed for the C kernels (then forward keeps BLAS on one thread)."""
        return isinstance(self.weights["wte.weight"], PackedMatrix)

    def dense(self, name: str) -> np.ndarray:
        """Weight `name` as the checkpoint's float32 array (Conv1D [in, out]; wte [vocab, n_embd])."""
        w = self.weights[name]
        if name == "wte.weight":
            return kernels.as_dense(w)
        return conv1d_weight(w)

    def new_cache(self, max_seq: int) -> KVCache:
        c = self.config
        return KVCache.allocate(c.n_layer, c.n_head, min(max_seq, self.n_ctx), c.head_dim)

    def _threads(self):
        return kernels.blas_single_thread() if self.packed else contextlib.nullcontext()

    def forward(self, tokens: np.ndarray, segments: list[Segment], trace: dict | None = None) -> np.ndarray:
        positions = np.concatenate([np.arange(s.start, s.start + s.length) for s in segments])  # [rows]
        with self._threads():  # the C kernels own the cores: numpy's BLAS stays on one thread
            x = embed(self.weights, tokens, positions)  # [rows, n_embd]
            for i in range(self.config.n_layer):
                x = block(x, self.weights, i, self.config, segments, self.path, trace)  # [rows, n_embd]
        return x

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return lm_head(hidden, self.weights, self.config)  # [rows, n_embd] -> [rows, vocab]

    def greedy_tokens(self, hidden: np.ndarray) -> np.ndarray | None:
        """argmax of `logits(hidden)` per row, without the full head product; None when no screen applies."""
        if self.head_screen is None:
            return None
        return self.head_screen.argmax(final_norm(hidden, self.weights, self.config))  # [rows, n_embd] -> [rows]

    def stages(self, layer: int = 0) -> "GPT2Stages":
        return GPT2Stages(self, layer)


class GPT2Stages:
    """Block-0 stages run alone on given inputs (the validator's isolated checkpoints).

    Each method calls the same stage function the forward pass uses."""

    def __init__(self, model: GPT2, layer: int = 0):
        self.m, self.i = model, layer
        self.w, self.cfg = model.weights, model.config
        self.p = f"h.{layer}."

    def norm_1(self, x):  # [seq, n_embd] -> [seq, n_embd]
        return layer_norm(x, self.w[self.p + "ln_1.weight"], self.w[self.p + "ln_1.bias"], self.cfg.layer_norm_epsilon)

    def qkv(self, h, start: int = 0):  # [seq, n_embd] -> 3 × [seq, n_head, head_dim]
        return qkv_projection(h, self.w[self.p + "attn.c_attn.weight"], self.w[self.p + "attn.c_attn.bias"], self.cfg.n_head)

    def scores(self, q, k, start: int = 0):  # [n, H, hd], [H, T, hd] -> [H, n, T]
        return attention_scores(q, k, start)

    def attn_out(self, scores, v):  # [H, n, T], [H, T, hd] -> [n, n_embd]
        return attention_output(scores, v, self.w[self.p + "attn.c_proj.weight"], self.w[self.p + "attn.c_proj.bias"])

    def ffn(self, h):  # [seq, n_embd] -> [seq, n_embd]
        w, p = self.w, self.p
        return ffn(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"], w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])

    def block(self, x):  # [seq, n_embd] -> [seq, n_embd], with a scratch cache
        cache = self.m.new_cache(x.shape[0])
        return block(x, self.w, self.i, self.cfg, [Segment(cache, 0, x.shape[0])], self.m.path)
