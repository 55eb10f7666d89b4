"""The Llama family in numpy (Llama, SmolLM2 and kin): one small pure function per checkpoint stage, composed into
a forward pass — the same shape of code as models/gpt2.py. formats/gguf_load.py builds it from a .gguf file.

Weights are a `LlamaWeights` (blocks: `LlamaBlock`) whose fields are named after the GGUF tensors
(`blk.0.attn_q.weight` is `blocks[0].attn_q_weight`), each matrix `[out, in]` (nn.Linear orientation), so a
projection is `x @ W.T` — written `linear(x, W)`, because with the C kernels built, Q4_1/Q8_0 (and Q4_0/Q5_0)
matrices stay quantized (`kernels.QuantMatrix`: the product is computed on the stored blocks, 4-5x fewer bytes per
decode step than float32; see kernels/quantized.py for its numerics) and every other matrix is packed for the
float kernel (`kernels.PackedMatrix`: F16 and BF16 kept at 16 bits, other types dequantized to float32). Vectors
(norms) are float32 arrays. `Llama.dense(name)` is any weight, by checkpoint name, as float32.

Rotary layout. llama.cpp's converter permutes the rows of `attn_q`/`attn_k` within each head so that its "NORM"
rope can rotate adjacent pairs (2i, 2i+1). The loader undoes that permutation (the same row permutation
transformers applies when it loads a GGUF), so `attn_q_weight` and `attn_k_weight` hold the *Hugging Face* row
order, and RoPE is Hugging Face's `rotate_half` form (pair i with i + head_dim/2). Q, K and the KV cache are then
the very tensors transformers computes. `Llama.qk_row_order[name]` is that permutation (rows of quantized blocks
permute as rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llorch_cpud.cache import KVCache, cache_read, cache_write
from llorch_cpud.kernels import as_dense, linear, linear_many, take_rows
from llorch_cpud.kernels import ops
from llorch_cpud.kernels.screen import HeadScreen
from llorch_cpud.models.base import (BlockWeights, Decoder, Segment, attend_segments, causal_mask, choose_path,
                                     softmax, step_path, trace_decode_block, trace_put)

@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    n_ff: int
    vocab_size: int
    n_ctx: int = 2048
    head_dim: int = 0  # 0: n_embd // n_head
    rope_base: float = 10000.0
    rope_linear_factor: float = 1.0  # positions are divided by this ("linear" rope scaling)
    rms_norm_eps: float = 1e-5
    tied_embeddings: bool = True  # no output.weight: the head is token_embd
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)

    @property
    def n_group(self) -> int:  # query heads per KV head
        return self.n_head // self.n_kv_head


@dataclass
class LlamaBlock(BlockWeights):
    """Block i's weights, named after the GGUF tensors `blk.{i}.*` (dots as underscores). Matrices are [out, in]:
    float32 arrays, or held for the C kernels (QuantMatrix, PackedMatrix); attn_q/attn_k rows in the Hugging Face
    rotary layout (the loader undoes llama.cpp's permutation)."""

    attn_norm_weight: np.ndarray  # [n_embd]
    attn_q_weight: object  # [H·hd, n_embd]
    attn_k_weight: object  # [Hkv·hd, n_embd]
    attn_v_weight: object  # [Hkv·hd, n_embd]
    attn_output_weight: object  # [n_embd, H·hd]
    ffn_norm_weight: np.ndarray  # [n_embd]
    ffn_gate_weight: object  # [n_ff, n_embd]
    ffn_up_weight: object  # [n_ff, n_embd]
    ffn_down_weight: object  # [n_embd, n_ff]

    def matrices(self) -> list:
        return [self.attn_q_weight, self.attn_k_weight, self.attn_v_weight, self.attn_output_weight,
                self.ffn_gate_weight, self.ffn_up_weight, self.ffn_down_weight]


@dataclass
class LlamaWeights:
    """A Llama's weights, named after the GGUF tensors; blocks[i] holds `blk.{i}.*`."""

    token_embd_weight: object  # [vocab, n_embd]
    blocks: list[LlamaBlock]
    output_norm_weight: np.ndarray  # [n_embd]
    output_weight: object | None = None  # [vocab, n_embd]; None: tied to token_embd
    rope_freqs_weight: np.ndarray | None = None  # [hd/2] llama.cpp's per-frequency divisors (RopeTables)

    @property
    def head(self):
        """The head [vocab, n_embd]: output.weight, or token_embd when the embeddings are tied."""
        return self.token_embd_weight if self.output_weight is None else self.output_weight


# ---------------------------------------------------------------- rotary tables


class RopeTables:
    """cos/sin of every position's rotation angles, [n_pos, head_dim] float32, computed once.

    Computed the way transformers does (float32 inverse frequencies, float32 angle = pos · inv_freq,
    each half repeated: `cat(freqs, freqs)`); a position beyond the table grows it (each row depends
    only on its own position, so growing never changes a row already handed out)."""

    def __init__(self, head_dim: int, base: float, n_pos: int, linear_factor: float = 1.0,
                 freq_factors: np.ndarray | None = None):
        self.head_dim, self.base, self.linear_factor = head_dim, base, linear_factor
        exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # [hd/2] float32, as HF
        powers = (np.float64(base) ** exponent.astype(np.float64)).astype(np.float32)  # correctly rounded float32 pow
        inv = np.float32(1.0) / powers  # [hd/2] float32
        if freq_factors is not None:  # llama.cpp rope_freqs.weight: theta_i / factor_i
            inv = (inv / np.asarray(freq_factors, dtype=np.float32)).astype(np.float32)
        self.inv_freq = inv  # [hd/2]
        self.cos = self.sin = np.zeros((0, head_dim), np.float32)
        self._grow(n_pos)

    def _grow(self, n_pos: int) -> None:
        pos = np.arange(n_pos, dtype=np.float32) / np.float32(self.linear_factor)  # [n_pos]
        freqs = pos[:, None] * self.inv_freq[None, :]  # [n_pos, 1] * [1, hd/2] -> [n_pos, hd/2] (float32)
        emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)  # [n_pos, hd]
        self.cos, self.sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)  # 2 × [n_pos, hd]

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin for the given absolute positions: 2 × [rows, head_dim]."""
        need = int(positions.max()) + 1 if positions.size else 0
        if need > self.cos.shape[0]:
            self._grow(max(need, 2 * self.cos.shape[0]))
        return self.cos[positions], self.sin[positions]  # 2 × [rows, hd]


# ---------------------------------------------------------------- stage functions


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Checkpoint 1. RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · weight (no mean, no bias)."""
    ms = np.add.reduce(x * x, axis=-1, keepdims=True) / np.float32(x.shape[-1])  # mean(x²): [rows, n_embd] -> [rows, 1]
    return weight * (x * (1.0 / np.sqrt(ms + np.float32(eps))))  # [rows, n_embd]


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1) over the halves of the last axis (Hugging Face's rotary layout)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [..., hd]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding of one row per position: x·cos + rotate_half(x)·sin."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]  # [rows, heads, hd] · [rows, 1, hd] -> [rows, heads, hd]


def qkv_projection(x, q_weight, k_weight, v_weight, n_head: int, n_kv_head: int, cos, sin, fast: bool = False):
    """Checkpoint 2. Q, K, V projections split into heads; RoPE applied to Q and K (HF row layout).
    `fast`: RoPE by the C kernel (kernels.ops.rope), the same function."""
    rope = ops.rope if fast else apply_rope
    rows = x.shape[0]
    q, k, v = linear_many(x, (q_weight, k_weight, v_weight))  # [rows, n_embd] -> [rows, H·hd], 2 × [rows, Hkv·hd]
    q = q.reshape(rows, n_head, -1)  # [rows, H·hd] -> [rows, n_head, hd]
    k = k.reshape(rows, n_kv_head, -1)  # [rows, Hkv·hd] -> [rows, n_kv_head, hd]
    v = v.reshape(rows, n_kv_head, -1)  # [rows, Hkv·hd] -> [rows, n_kv_head, hd]
    return rope(q, cos, sin), rope(k, cos, sin), v  # [rows, H, hd], [rows, Hkv, hd], [rows, Hkv, hd]


def attention_scores(q: np.ndarray, k: np.ndarray, start: int) -> np.ndarray:
    """Checkpoint 4. Grouped-query Q·Kᵀ/sqrt(head_dim) with the causal mask (masked = -inf), before softmax.

    Query head h reads KV head h // (n_head / n_kv_head), as transformers' repeat_kv does; the group's
    query heads are stacked along the row axis so K is multiplied once, never copied."""
    n, n_head, head_dim = q.shape  # q: [n, H, hd]; k: [Hkv, T, hd]
    n_kv, total, _ = k.shape
    g = n_head // n_kv
    qg = q.transpose(1, 0, 2).reshape(n_kv, g * n, head_dim)  # [n, H, hd] -> [H, n, hd] -> [Hkv, g·n, hd]
    scores = (qg @ k.transpose(0, 2, 1)).reshape(n_head, n, total)  # [Hkv, g·n, hd] @ [Hkv, hd, T] -> [H, n, T]
    scores *= np.float32(1.0 / math.sqrt(head_dim))
    if n > 1 or start + n != total:
        scores[:, causal_mask(start, n, total)] = -np.inf  # [H, n, T]
    return scores


def attention_heads(scores: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax, weighted sum of V (grouped), heads merged: [H, n, T], [Hkv, T, hd] -> [n, H·hd]."""
    n_head, n, total = scores.shape  # scores: [H, n, T]; v: [Hkv, T, hd]
    n_kv, _, head_dim = v.shape
    weights = softmax(scores).reshape(n_kv, -1, total)  # [H, n, T] -> [Hkv, g·n, T]
    heads = (weights @ v).reshape(n_head, n, head_dim)  # [Hkv, g·n, T] @ [Hkv, T, hd] -> [H, n, hd]
    return heads.transpose(1, 0, 2).reshape(n, n_head * head_dim)  # [H, n, hd] -> [n, H·hd]


def attention_output(scores: np.ndarray, v: np.ndarray, o_weight: np.ndarray) -> np.ndarray:
    """Checkpoint 5. softmax, weighted sum of V (grouped), merge heads, output projection."""
    return linear(attention_heads(scores, v), o_weight)  # [n, H·hd] -> [n, n_embd]


def silu(x: np.ndarray) -> np.ndarray:
    """x · sigmoid(x) (exp(-x) may overflow to inf for x < -88: the result is then -0, as it should be)."""
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def ffn(x, gate_weight, up_weight, down_weight, fast: bool = False) -> np.ndarray:
    """Checkpoint 6. SwiGLU: down(silu(gate(x)) · up(x)). `fast`: silu(gate) · up by one C call."""
    gate, up = linear_many(x, (gate_weight, up_weight))  # [rows, n_embd] -> 2 × [rows, n_ff]
    h = ops.silu_mul(gate, up) if fast else silu(gate) * up  # [rows, n_ff]
    return linear(h, down_weight)  # [rows, n_ff] -> [rows, n_embd]


def attention(x, blk: LlamaBlock, i: int, cfg: LlamaConfig, segments: list[Segment], cos, sin,
              path: str = "numpy", trace=None) -> np.ndarray:
    """Self-attention of block i over every segment, writing K/V into each segment's cache (`path`: the model's)."""
    q, k, v = qkv_projection(x, blk.attn_q_weight, blk.attn_k_weight, blk.attn_v_weight, cfg.n_head, cfg.n_kv_head,
                             cos, sin, step_path(path, segments) == "stages")
    trace_put(trace, i, "q", q)
    trace_put(trace, i, "k", k)
    trace_put(trace, i, "v", v)
    merged = np.empty((x.shape[0], cfg.n_head * cfg.head_dim), np.float32)  # [rows, H·hd]
    attend_segments(q, k, v, segments, i, merged, path != "numpy", trace, cache_write, cache_read, attention_scores,
                    attention_heads)  # [rows, H·hd]
    out = linear(merged, blk.attn_output_weight)  # checkpoint 5 for every row: [rows, H·hd] -> [rows, n_embd]
    trace_put(trace, i, "attn_out", out)
    return out


def block(x, blk: LlamaBlock, i: int, cfg: LlamaConfig, segments: list[Segment], cos, sin, path: str = "numpy",
          trace=None) -> np.ndarray:
    """Checkpoint 7. Block i: pre-norm attention and SwiGLU FFN, each with its residual. `path`: the model's
    (base.PATHS): fused runs decode steps as one C call, any other step as stages."""
    step = step_path(path, segments)
    if step == "fused":
        return decode_block(x, blk, i, cfg, segments, cos, sin, trace)  # [rows, n_embd]
    fast = step == "stages"
    norm = ops.rms_norm if fast else rms_norm
    trace_put(trace, i, "block_in", x)
    h = norm(x, blk.attn_norm_weight, cfg.rms_norm_eps)  # [rows, n_embd]
    trace_put(trace, i, "ln_1", h)
    x = x + attention(h, blk, i, cfg, segments, cos, sin, path, trace)  # [rows, n_embd]
    h = norm(x, blk.ffn_norm_weight, cfg.rms_norm_eps)  # [rows, n_embd]
    trace_put(trace, i, "ln_2", h)
    f = ffn(h, blk.ffn_gate_weight, blk.ffn_up_weight, blk.ffn_down_weight, fast)  # [rows, n_embd]
    trace_put(trace, i, "ffn_out", f)
    x = x + f  # [rows, n_embd]
    trace_put(trace, i, "block_out", x)
    return x


def embed(w: LlamaWeights, tokens: np.ndarray) -> np.ndarray:
    """Token embeddings (no position embedding: positions enter through RoPE)."""
    return take_rows(w.token_embd_weight, tokens)  # [rows] -> [rows, n_embd]


def final_norm(x: np.ndarray, w: LlamaWeights, cfg: LlamaConfig) -> np.ndarray:
    """The final RMSNorm, the head's input: [rows, n_embd] -> [rows, n_embd]."""
    return rms_norm(x, w.output_norm_weight, cfg.rms_norm_eps)


def lm_head(x: np.ndarray, w: LlamaWeights, cfg: LlamaConfig) -> np.ndarray:
    """Checkpoint 8 (last step). Final RMSNorm, then the head (token_embd when output.weight is absent)."""
    h = final_norm(x, w, cfg)  # [rows, n_embd]
    return linear(h, w.head)  # [rows, n_embd] @ [n_embd, vocab] -> [rows, vocab]


def decode_kernel(blk: LlamaBlock, cfg: LlamaConfig) -> ops.DecodeBlock:
    """Block `blk`'s decode step as one prepared C call (built once; the block drops it when a weight is replaced)."""
    if blk.decode is None:
        blk.decode = ops.DecodeBlock(blk.attn_norm_weight, [blk.attn_q_weight, blk.attn_k_weight, blk.attn_v_weight],
                                     blk.attn_output_weight, blk.ffn_norm_weight, [blk.ffn_gate_weight, blk.ffn_up_weight],
                                     blk.ffn_down_weight, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rms_norm_eps)
    return blk.decode


def decode_block(x, blk: LlamaBlock, i: int, cfg: LlamaConfig, segments: list[Segment], cos, sin,
                 trace=None) -> np.ndarray:
    """`block` for a decode step on the fused path (every segment one row, kernel weights) as one C call: the
    kernels.ops versions of its stage functions in its order (kernels.ops.DecodeBlock), which copies its
    stage tensors out for a trace."""
    stages = {} if trace is not None and i == 0 else None
    out = decode_kernel(blk, cfg)(x, cos, sin, [s.cache for s in segments], [s.start + 1 for s in segments], i,
                                  stages)  # [B, n_embd] -> [B, n_embd]
    trace_decode_block(trace, i, x, stages, out, segments)
    return out


# ---------------------------------------------------------------- the model


class Llama(Decoder):
    family = "llama"

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, names: dict, rope: RopeTables | None = None,
                 qk_row_order: dict[str, np.ndarray] | None = None, path: str | None = None,
                 numerics: str = "float32"):
        """`names`: checkpoint name -> (block, field), the loader's name table expanded (base.expand_names).
        `numerics` (kernels.quantized.NUMERICS): what the loader built the quantized matrices for; "q8" also
        keeps the KV cache in float16, as llama.cpp does."""
        self.config = config
        self.weights = weights
        self.names = names
        self.numerics = numerics
        self.path = choose_path(path, self._matrices())
        self.n_ctx = config.n_ctx
        self.vocab_size = config.vocab_size
        self.eos_token_id = config.eos_token_id
        self.rope = rope or RopeTables(config.head_dim, config.rope_base, min(config.n_ctx, 8192),
                                       config.rope_linear_factor, weights.rope_freqs_weight)
        self.qk_row_order = qk_row_order or {}  # checkpoint name -> the row order the loader applied (HF layout)
        self.head_screen = HeadScreen.build(weights.head)  # greedy picks at half the head's bytes
        self._prepare(decode_kernel)

    def dense(self, name: str) -> np.ndarray:
        """Weight `name` (checkpoint name) as a float32 array (a quantized matrix dequantized: the values the
        kernels use)."""
        return as_dense(getattr(*self.tensor_slot(name)))

    def new_cache(self, max_seq: int) -> KVCache:
        """A KV cache for max_seq positions: float32, or float16 in the `q8` numerics (llama.cpp's cache)."""
        c = self.config
        dtype = np.float16 if self.numerics == "q8" else np.float32
        return KVCache.allocate(c.n_layer, c.n_kv_head, min(max_seq, self.n_ctx), c.head_dim, dtype)

    def forward(self, tokens: np.ndarray, segments: list[Segment], trace: dict | None = None) -> np.ndarray:
        positions = np.concatenate([np.arange(s.start, s.start + s.length) for s in segments])  # [rows]
        cos, sin = self.rope.rows(positions)  # 2 × [rows, hd]
        with self._threads():  # quantized kernels own the cores: numpy's BLAS stays on one thread
            x = embed(self.weights, tokens)  # [rows, n_embd]
            for i, blk in enumerate(self.weights.blocks):
                x = block(x, blk, i, self.config, segments, cos, sin, self.path, trace)  # [rows, n_embd]
        return x

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return lm_head(hidden, self.weights, self.config)  # [rows, n_embd] -> [rows, vocab]

    def final_norm(self, hidden: np.ndarray) -> np.ndarray:
        return final_norm(hidden, self.weights, self.config)  # [rows, n_embd] -> [rows, n_embd], the head's input

    def stages(self, layer: int = 0) -> "LlamaStages":
        return LlamaStages(self, layer)


class LlamaStages:
    """Block stages run alone on given inputs (the validator's isolated checkpoints).

    Each method calls the same stage function the forward pass uses."""

    def __init__(self, model: Llama, layer: int = 0):
        self.m, self.i = model, layer
        self.b, self.cfg = model.weights.blocks[layer], model.config

    def norm_1(self, x):  # [seq, n_embd] -> [seq, n_embd]
        return rms_norm(x, self.b.attn_norm_weight, self.cfg.rms_norm_eps)

    def qkv(self, h, start: int = 0):  # [seq, n_embd] -> [seq, H, hd], 2 × [seq, Hkv, hd]
        cos, sin = self.m.rope.rows(np.arange(start, start + h.shape[0]))  # 2 × [seq, hd]
        b = self.b
        return qkv_projection(h, b.attn_q_weight, b.attn_k_weight, b.attn_v_weight, self.cfg.n_head,
                              self.cfg.n_kv_head, cos, sin)

    def scores(self, q, k, start: int = 0):  # [n, H, hd], [Hkv, T, hd] -> [H, n, T]
        return attention_scores(q, k, start)

    def attn_out(self, scores, v):  # [H, n, T], [Hkv, T, hd] -> [n, n_embd]
        return attention_output(scores, v, self.b.attn_output_weight)

    def ffn(self, h):  # [seq, n_embd] -> [seq, n_embd]
        return ffn(h, self.b.ffn_gate_weight, self.b.ffn_up_weight, self.b.ffn_down_weight)

    def block(self, x):  # [seq, n_embd] -> [seq, n_embd], with a scratch cache
        cache = self.m.new_cache(x.shape[0])
        cos, sin = self.m.rope.rows(np.arange(x.shape[0]))  # 2 × [seq, hd]
        return block(x, self.b, self.i, self.cfg, [Segment(cache, 0, x.shape[0])], cos, sin, self.m.path)
