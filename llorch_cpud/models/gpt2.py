"""GPT-2 in numpy: one small pure function per checkpoint stage, composed into a forward pass.

Weights are a `GPT2Weights` (blocks: `GPT2Block`), whose fields are named after the Hugging Face checkpoint's
tensors (`h.0.attn.c_attn.weight` is `blocks[0].attn_c_attn_weight`); formats/hf.py builds them through its name
table. Conv1D weights are [in, out], so a projection is `x @ W + b` - written `conv1d(x, W, b)`, because
with the C kernels built the loader packs each W (as Wᵀ, `kernels.PackedMatrix`) for a kernel that
reads the weights once per batched decode step (see kernels/packed.py). `GPT2.dense(name)` is any
weight, by checkpoint name, as the checkpoint's float32 array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llorch_cpud import kernels
from llorch_cpud.cache import KVCache, cache_read, cache_write
from llorch_cpud.kernels import PackedMatrix, linear, take_rows
from llorch_cpud.kernels import ops
from llorch_cpud.kernels.screen import HeadScreen
from llorch_cpud.models.base import (BlockWeights, Decoder, Segment, attend_segments, causal_mask, choose_path,
                                     softmax, step_path, trace_decode_block, trace_put)


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


Matrix = "np.ndarray | PackedMatrix"  # a Conv1D weight: [in, out] float32 array, or packed (Wᵀ) for the C kernels


@dataclass
class GPT2Block(BlockWeights):
    """Block i's weights, named after the checkpoint's `h.{i}.*` tensors (dots as underscores)."""

    ln_1_weight: np.ndarray  # [n_embd]
    ln_1_bias: np.ndarray  # [n_embd]
    attn_c_attn_weight: Matrix  # [n_embd, 3·n_embd]
    attn_c_attn_bias: np.ndarray  # [3·n_embd]
    attn_c_proj_weight: Matrix  # [n_embd, n_embd]
    attn_c_proj_bias: np.ndarray  # [n_embd]
    ln_2_weight: np.ndarray  # [n_embd]
    ln_2_bias: np.ndarray  # [n_embd]
    mlp_c_fc_weight: Matrix  # [n_embd, n_inner]
    mlp_c_fc_bias: np.ndarray  # [n_inner]
    mlp_c_proj_weight: Matrix  # [n_inner, n_embd]
    mlp_c_proj_bias: np.ndarray  # [n_embd]

    def matrices(self) -> list:
        return [self.attn_c_attn_weight, self.attn_c_proj_weight, self.mlp_c_fc_weight, self.mlp_c_proj_weight]


@dataclass
class GPT2Weights:
    """A GPT-2's weights, named after the checkpoint's tensors; blocks[i] holds `h.{i}.*`."""

    wte_weight: "np.ndarray | PackedMatrix"  # [vocab, n_embd] token embeddings, also the tied head
    wpe_weight: np.ndarray  # [n_positions, n_embd] learned position embeddings
    blocks: list[GPT2Block]
    ln_f_weight: np.ndarray  # [n_embd]
    ln_f_bias: np.ndarray  # [n_embd]


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


def attention_scores(q: np.ndarray, k: np.ndarray, start: int) -> np.ndarray:
    """Checkpoint 4. Q·Kᵀ/sqrt(head_dim) with the causal mask (masked = -inf), before softmax."""
    n, n_head, head_dim = q.shape  # q: [n, n_head, head_dim]; k: [n_head, T, head_dim]
    total = k.shape[1]
    scores = q.transpose(1, 0, 2) @ k.transpose(0, 2, 1)  # [n_head, n, hd] @ [n_head, hd, T] -> [n_head, n, T]
    scores *= 1.0 / math.sqrt(head_dim)
    if n > 1 or start + n != total:
        scores[:, causal_mask(start, n, total)] = -np.inf  # [n_head, n, T]
    return scores


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


def attention(x, blk: GPT2Block, i: int, cfg: GPT2Config, segments: list[Segment], path: str = "numpy",
              trace=None) -> np.ndarray:
    """Self-attention of block i over every segment, writing K/V into each segment's cache (`path`: the model's)."""
    q, k, v = qkv_projection(x, blk.attn_c_attn_weight, blk.attn_c_attn_bias, cfg.n_head)  # 3 × [rows, H, hd]
    trace_put(trace, i, "q", q)
    trace_put(trace, i, "k", k)
    trace_put(trace, i, "v", v)
    merged = np.empty_like(x)  # [rows, n_embd]
    attend_segments(q, k, v, segments, i, merged, path != "numpy", trace, cache_write, cache_read, attention_scores,
                    attention_heads)  # [rows, H·hd]
    out = conv1d(merged, blk.attn_c_proj_weight, blk.attn_c_proj_bias)  # checkpoint 5, every row: [rows, n_embd]
    trace_put(trace, i, "attn_out", out)
    return out


def block(x, blk: GPT2Block, i: int, cfg: GPT2Config, segments: list[Segment], path: str = "numpy",
          trace=None) -> np.ndarray:
    """Checkpoint 7. Block i: pre-norm attention and FFN, each with its residual. `path`: the model's
    (base.PATHS): fused runs decode steps as one C call, any other step as stages."""
    step = step_path(path, segments)
    if step == "fused":
        return decode_block(x, blk, i, cfg, segments, trace)  # [rows, n_embd]
    fast = step == "stages"
    norm = ops.layer_norm if fast else layer_norm
    trace_put(trace, i, "block_in", x)
    h = norm(x, blk.ln_1_weight, blk.ln_1_bias, cfg.layer_norm_epsilon)  # [rows, n_embd]
    trace_put(trace, i, "ln_1", h)
    x = x + attention(h, blk, i, cfg, segments, path, trace)  # [rows, n_embd]
    h = norm(x, blk.ln_2_weight, blk.ln_2_bias, cfg.layer_norm_epsilon)  # [rows, n_embd]
    trace_put(trace, i, "ln_2", h)
    f = ffn(h, blk.mlp_c_fc_weight, blk.mlp_c_fc_bias, blk.mlp_c_proj_weight, blk.mlp_c_proj_bias, fast)  # [rows, n_embd]
    trace_put(trace, i, "ffn_out", f)
    x = x + f  # [rows, n_embd]
    trace_put(trace, i, "block_out", x)
    return x


def decode_kernel(blk: GPT2Block, cfg: GPT2Config) -> ops.DecodeBlock:
    """Block `blk`'s decode step as one prepared C call (built once; the block drops it when a weight is replaced)."""
    if blk.decode is None:
        blk.decode = ops.DecodeBlock(blk.ln_1_weight, [blk.attn_c_attn_weight], blk.attn_c_proj_weight, blk.ln_2_weight,
                                     [blk.mlp_c_fc_weight], blk.mlp_c_proj_weight, cfg.n_head, cfg.n_head,
                                     cfg.head_dim, cfg.layer_norm_epsilon, norm_biases=(blk.ln_1_bias, blk.ln_2_bias),
                                     biases=(blk.attn_c_attn_bias, blk.attn_c_proj_bias, blk.mlp_c_fc_bias,
                                             blk.mlp_c_proj_bias), gelu=(GELU_C, GELU_K))
    return blk.decode


def decode_block(x, blk: GPT2Block, i: int, cfg: GPT2Config, segments: list[Segment], trace=None) -> np.ndarray:
    """`block` for a decode step on the fused path (every segment one row, packed weights) as one C call: the
    kernels.ops versions of its stage functions in its order (kernels.ops.DecodeBlock), which copies its
    stage tensors out for a trace."""
    stages = {} if trace is not None and i == 0 else None
    out = decode_kernel(blk, cfg)(x, None, None, [s.cache for s in segments], [s.start + 1 for s in segments], i,
                                  stages)  # [B, n_embd] -> [B, n_embd]
    trace_decode_block(trace, i, x, stages, out, segments)
    return out


def embed(w: GPT2Weights, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Token plus learned absolute position embeddings."""
    return take_rows(w.wte_weight, tokens) + w.wpe_weight[positions]  # [rows] -> [rows, n_embd]


def final_norm(x: np.ndarray, w: GPT2Weights, cfg: GPT2Config) -> np.ndarray:
    """The final LayerNorm, the head's input: [rows, n_embd] -> [rows, n_embd]."""
    return layer_norm(x, w.ln_f_weight, w.ln_f_bias, cfg.layer_norm_epsilon)


def lm_head(x: np.ndarray, w: GPT2Weights, cfg: GPT2Config) -> np.ndarray:
    """Checkpoint 8 (last step). Final LayerNorm, then the tied head: logits = ln_f(x) · wteᵀ."""
    h = final_norm(x, w, cfg)  # [rows, n_embd]
    return linear(h, w.wte_weight)  # [rows, n_embd] @ [n_embd, vocab] -> [rows, vocab]


# ---------------------------------------------------------------- the model


class GPT2(Decoder):
    family = "gpt2"

    def __init__(self, config: GPT2Config, weights: GPT2Weights, names: dict, path: str | None = None,
                 numerics: str = "float32"):
        """`names`: checkpoint name -> (block, field), the loader's name table expanded (base.expand_names).
        `numerics`: GPT-2 has no quantized products, so only "float32"."""
        if numerics != "float32":
            raise ValueError(f"GPT-2 computes in float32 only (its weights are not quantized), not {numerics!r}")
        self.config = config
        self.weights = weights
        self.names = names
        self.numerics = numerics
        self.path = choose_path(path, self._matrices())
        self.n_ctx = config.n_positions
        self.vocab_size = config.vocab_size
        self.eos_token_id = config.eos_token_id
        self.head_screen = HeadScreen.build(weights.wte_weight)  # greedy picks at half the head's bytes
        self._prepare(decode_kernel)

    def dense(self, name: str) -> np.ndarray:
        """Weight `name` as the checkpoint's float32 array (Conv1D [in, out]; wte [vocab, n_embd])."""
        w = getattr(*self.tensor_slot(name))
        if name == "wte.weight":
            return kernels.as_dense(w)
        return conv1d_weight(w)

    def new_cache(self, max_seq: int) -> KVCache:
        c = self.config
        return KVCache.allocate(c.n_layer, c.n_head, min(max_seq, self.n_ctx), c.head_dim)

    def forward(self, tokens: np.ndarray, segments: list[Segment], trace: dict | None = None) -> np.ndarray:
        positions = np.concatenate([np.arange(s.start, s.start + s.length) for s in segments])  # [rows]
        with self._threads():  # the C kernels own the cores: numpy's BLAS stays on one thread
            x = embed(self.weights, tokens, positions)  # [rows, n_embd]
            for i, blk in enumerate(self.weights.blocks):
                x = block(x, blk, i, self.config, segments, self.path, trace)  # [rows, n_embd]
        return x

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return lm_head(hidden, self.weights, self.config)  # [rows, n_embd] -> [rows, vocab]

    def final_norm(self, hidden: np.ndarray) -> np.ndarray:
        return final_norm(hidden, self.weights, self.config)  # [rows, n_embd] -> [rows, n_embd], the head's input

    def stages(self, layer: int = 0) -> "GPT2Stages":
        return GPT2Stages(self, layer)


class GPT2Stages:
    """Block stages run alone on given inputs (the validator's isolated checkpoints).

    Each method calls the same stage function the forward pass uses."""

    def __init__(self, model: GPT2, layer: int = 0):
        self.m, self.i = model, layer
        self.b, self.cfg = model.weights.blocks[layer], model.config

    def norm_1(self, x):  # [seq, n_embd] -> [seq, n_embd]
        return layer_norm(x, self.b.ln_1_weight, self.b.ln_1_bias, self.cfg.layer_norm_epsilon)

    def qkv(self, h, start: int = 0):  # [seq, n_embd] -> 3 × [seq, n_head, head_dim]
        return qkv_projection(h, self.b.attn_c_attn_weight, self.b.attn_c_attn_bias, self.cfg.n_head)

    def scores(self, q, k, start: int = 0):  # [n, H, hd], [H, T, hd] -> [H, n, T]
        return attention_scores(q, k, start)

    def attn_out(self, scores, v):  # [H, n, T], [H, T, hd] -> [n, n_embd]
        return attention_output(scores, v, self.b.attn_c_proj_weight, self.b.attn_c_proj_bias)

    def ffn(self, h):  # [seq, n_embd] -> [seq, n_embd]
        b = self.b
        return ffn(h, b.mlp_c_fc_weight, b.mlp_c_fc_bias, b.mlp_c_proj_weight, b.mlp_c_proj_bias)

    def block(self, x):  # [seq, n_embd] -> [seq, n_embd], with a scratch cache
        cache = self.m.new_cache(x.shape[0])
        return block(x, self.b, self.i, self.cfg, [Segment(cache, 0, x.shape[0])], self.m.path)
