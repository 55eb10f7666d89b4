"""The Llama family in numpy (Llama, SmolLM2 and kin), loaded from GGUF: one small pure function per
checkpoint stage, composed into a forward pass — the same shape of code as models/gpt2.py.

Weights are keyed by the GGUF tensor names (`token_embd.weight`, `blk.0.attn_q.weight`, ...), each
`[out, in]` (nn.Linear orientation), so a projection is `x @ W.T` — written `linear(x, W)`, because
with the C kernels built, Q4_1/Q8_0 (and Q4_0/Q5_0) matrices stay quantized (`kernels.QuantMatrix`: the product is
computed on the stored blocks, 4-5x fewer bytes per decode step than float32; see kernels/quantized.py
for its numerics) and every other matrix is packed for the float kernel (`kernels.PackedMatrix`: F16
and BF16 kept at 16 bits, other types dequantized to float32). Vectors (norms) are float32 arrays.
`Llama.dense(name)` is any weight as float32.

Rotary layout. llama.cpp's converter permutes the rows of `attn_q`/`attn_k` within each head so
that its "NORM" rope can rotate adjacent pairs (2i, 2i+1). At load we undo that permutation (the
same row permutation transformers applies when it loads a GGUF), so `weights["blk.N.attn_q.weight"]`
and `["blk.N.attn_k.weight"]` hold the *Hugging Face* row order, and RoPE is Hugging Face's
`rotate_half` form (pair i with i + head_dim/2). Q, K and the KV cache are then the very tensors
transformers computes. `Llama.qk_row_order[name]` is that permutation, so quantized kernels can
read `Llama.gguf.raw(name)[qk_row_order[name]]` (rows of quantized blocks permute as rows).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np

from llorch_cpud.cache import KVCache, cache_read, cache_write
from llorch_cpud.errors import ModelLoadError
from llorch_cpud import kernels
from llorch_cpud.kernels import KernelMatrix, PackedMatrix, QuantMatrix, as_dense, linear, linear_many, take_rows
from llorch_cpud.kernels import ops
from llorch_cpud.kernels.screen import HeadScreen
from llorch_cpud.models.base import (Segment, attend_segments, choose_path, step_path, trace_decode_block,
                                     trace_put)

#: `general.architecture` values this module runs (same tensors, same math as Llama).
SUPPORTED_ARCHITECTURES = ("llama",)


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

    @classmethod
    def from_gguf(cls, f) -> "LlamaConfig":
        """From a GGUFFile's metadata; ModelLoadError naming the key at fault."""
        arch = f.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{f.path}: unsupported model architecture general.architecture = {arch!r:.60} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        a = arch + "."

        def integer(key: str, lo: int, hi: int, default: int | None = None) -> int:
            value = f.require(a + key) if default is None else f.get(a + key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ModelLoadError(f"{f.path}: GGUF metadata key {a + key!r} should be an integer in [{lo}, {hi}], "
                                     f"got {value!r:.60}")
            return value

        def number(key: str, default: float | None = None, above: float = 0.0, below: float = math.inf) -> float:
            value = f.require(a + key) if default is None else f.get(a + key, default)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not above < value < below):
                rule = f"a finite number above {above:g}" + (f" and below {below:g}" if below < math.inf else "")
                raise ModelLoadError(f"{f.path}: GGUF metadata key {a + key!r} should be {rule}, got {value!r:.60}")
            return float(value)

        # Bounds far beyond any Llama-family model (405B: 126 blocks, 16384 wide, 128 heads, 53248 FFN; 10M
        # context), far below what would make the checks and tables built from them a runaway allocation.
        n_layer = integer("block_count", 1, 1024)
        n_embd = integer("embedding_length", 1, 1 << 16)
        n_head = integer("attention.head_count", 1, 1 << 12)
        n_kv_head = integer("attention.head_count_kv", 1, 1 << 12, n_head)
        if n_head % n_kv_head:
            raise ModelLoadError(f"{f.path}: GGUF metadata key {a + 'attention.head_count_kv'!r} = {n_kv_head} does "
                                 f"not divide {a + 'attention.head_count'!r} = {n_head}")
        if a + "attention.key_length" not in f.metadata and n_embd % n_head:
            raise ModelLoadError(f"{f.path}: GGUF metadata key {a + 'embedding_length'!r} = {n_embd} is not divisible "
                                 f"by {a + 'attention.head_count'!r} = {n_head} (and no {a + 'attention.key_length'!r} "
                                 f"gives the head size)")
        head_dim = integer("attention.key_length", 1, 1 << 12, n_embd // n_head)
        if integer("attention.value_length", 1, 1 << 12, head_dim) != head_dim:
            raise ModelLoadError(f"{f.path}: {a}attention.value_length differs from key_length (unsupported)")
        if head_dim % 2:
            raise ModelLoadError(f"{f.path}: head_dim {head_dim} is odd; rotary embedding needs an even one")
        rope_dim = integer("rope.dimension_count", 1, 1 << 12, head_dim)
        if rope_dim != head_dim:
            raise ModelLoadError(f"{f.path}: {a}rope.dimension_count = {rope_dim} (partial rotary) "
                                 f"is unsupported; head_dim is {head_dim}")
        scaling = f.get(a + "rope.scaling.type") or "none"
        if scaling not in ("none", "linear"):
            raise ModelLoadError(f"{f.path}: {a}rope.scaling.type = {scaling!r:.60} is unsupported (none, linear are)")
        factor = number("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        if f.get(a + "expert_count", 0):
            raise ModelLoadError(f"{f.path}: {a}expert_count = {f.get(a + 'expert_count')!r:.60}: mixture-of-experts "
                                 f"Llama models are unsupported")
        embd = f.info("token_embd.weight")  # its rows are the vocabulary the model has
        if len(embd.shape) != 2 or not 1 <= embd.shape[0] <= 1 << 22:
            raise ModelLoadError(f"{f.path}: tensor 'token_embd.weight' has shape {embd.shape}, expected "
                                 f"[vocabulary (1 to {1 << 22}), {a}embedding_length]")
        vocab = embd.shape[0]
        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=n_kv_head,
            n_ff=integer("feed_forward_length", 1, 1 << 18),
            vocab_size=vocab,
            n_ctx=integer("context_length", 1, 1 << 24, 2048),
            head_dim=head_dim,
            rope_base=number("rope.freq_base", 10000.0),
            rope_linear_factor=factor,
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", below=1.0),
            tied_embeddings="output.weight" not in f,
            architecture=arch,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        )


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


def causal_mask(start: int, n: int, total: int) -> np.ndarray:
    """True where query row i (absolute position start+i) must not see key j."""
    return np.arange(total)[None, :] > (start + np.arange(n))[:, None]  # [n, total]


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


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # [..., T]
    return e / e.sum(axis=-1, keepdims=True)  # [..., T]


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


def attention(x, w: dict, i: int, cfg: LlamaConfig, segments: list[Segment], cos, sin, path: str = "numpy",
              trace=None) -> np.ndarray:
    """Self-attention of block i over every segment, writing K/V into each segment's cache (`path`: the model's)."""
    p = f"blk.{i}."
    q, k, v = qkv_projection(x, w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"], cfg.n_head,
                             cfg.n_kv_head, cos, sin, step_path(path, segments) == "stages")
    trace_put(trace, i, "q", q)
    trace_put(trace, i, "k", k)
    trace_put(trace, i, "v", v)
    merged = np.empty((x.shape[0], cfg.n_head * cfg.head_dim), np.float32)  # [rows, H·hd]
    attend_segments(q, k, v, segments, i, merged, path != "numpy", trace, cache_write, cache_read, attention_scores,
                    attention_heads)  # [rows, H·hd]
    out = linear(merged, w[p + "attn_output.weight"])  # checkpoint 5 for every row: [rows, H·hd] -> [rows, n_embd]
    trace_put(trace, i, "attn_out", out)
    return out


_BLOCK_MATRICES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
                   "ffn_up.weight", "ffn_down.weight")


def block(x, w: dict, i: int, cfg: LlamaConfig, segments: list[Segment], cos, sin, path: str = "numpy",
          trace=None) -> np.ndarray:
    """Checkpoint 7. One decoder block: pre-norm attention and SwiGLU FFN, each with its residual. `path`: the
    model's (base.PATHS): fused runs decode steps as one C call, any other step as stages."""
    p = f"blk.{i}."
    step = step_path(path, segments)
    if step == "fused":
        return decode_block(x, w, i, cfg, segments, cos, sin, trace)  # [rows, n_embd]
    fast = step == "stages"
    norm = ops.rms_norm if fast else rms_norm
    trace_put(trace, i, "block_in", x)
    h = norm(x, w[p + "attn_norm.weight"], cfg.rms_norm_eps)  # [rows, n_embd]
    trace_put(trace, i, "ln_1", h)
    x = x + attention(h, w, i, cfg, segments, cos, sin, path, trace)  # [rows, n_embd]
    h = norm(x, w[p + "ffn_norm.weight"], cfg.rms_norm_eps)  # [rows, n_embd]
    trace_put(trace, i, "ln_2", h)
    f = ffn(h, w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"], fast)  # [rows, n_embd]
    trace_put(trace, i, "ffn_out", f)
    x = x + f  # [rows, n_embd]
    trace_put(trace, i, "block_out", x)
    return x


def embed(w: dict, tokens: np.ndarray) -> np.ndarray:
    """Token embeddings (no position embedding: positions enter through RoPE)."""
    return take_rows(w["token_embd.weight"], tokens)  # [rows] -> [rows, n_embd]


def final_norm(x: np.ndarray, w: dict, cfg: LlamaConfig) -> np.ndarray:
    """The final RMSNorm, the head's input: [rows, n_embd] -> [rows, n_embd]."""
    return rms_norm(x, w["output_norm.weight"], cfg.rms_norm_eps)


def head_weight(w: dict):
    """The head [vocab, n_embd]: output.weight, or token_embd when the embeddings are tied."""
    return w.get("output.weight", w["token_embd.weight"])


def lm_head(x: np.ndarray, w: dict, cfg: LlamaConfig) -> np.ndarray:
    """Checkpoint 8 (last step). Final RMSNorm, then the head (token_embd when output.weight is absent)."""
    h = final_norm(x, w, cfg)  # [rows, n_embd]
    return linear(h, head_weight(w))  # [rows, n_embd] @ [n_embd, vocab] -> [rows, vocab]


def decode_block(x, w: dict, i: int, cfg: LlamaConfig, segments: list[Segment], cos, sin, trace=None) -> np.ndarray:
    """`block` for a decode step on the fused path (every segment one row, kernel weights) as one C call: the
    kernels.ops versions of its stage functions in its order (kernels.ops.decode_block), which copies its
    stage tensors out for a trace."""
    p = f"blk.{i}."
    stages = {} if trace is not None and i == 0 else None
    out = ops.decode_block(x, w[p + "attn_norm.weight"], [w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"]],
                           w[p + "attn_output.weight"], w[p + "ffn_norm.weight"], [w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"]],
                           w[p + "ffn_down.weight"], cos, sin, [s.cache for s in segments], [s.start + 1 for s in segments], i,
                           cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rms_norm_eps, trace=stages)  # [B, n_embd]
    trace_decode_block(trace, i, x, stages, out, segments)
    return out


# ---------------------------------------------------------------- the model


class Llama:
    family = "llama"
    numerics = "float32"  # quantized products' activations and the KV cache dtype (formats.apply_numerics)

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], rope: RopeTables | None = None,
                 gguf=None, qk_row_order: dict[str, np.ndarray] | None = None, path: str | None = None):
        self.config = config
        self.weights = weights
        self.path = choose_path(path, [weights[f"blk.{i}.{n}"] for i in range(config.n_layer) for n in _BLOCK_MATRICES])
        self.n_ctx = config.n_ctx
        self.vocab_size = config.vocab_size
        self.eos_token_id = config.eos_token_id
        self.rope = rope or RopeTables(config.head_dim, config.rope_base, min(config.n_ctx, 8192),
                                       config.rope_linear_factor)
        self.gguf = gguf  # the open GGUFFile (raw quantized blocks stay reachable through .raw(name))
        self.qk_row_order = qk_row_order or {}
        self.head_screen = HeadScreen.build(head_weight(weights))  # greedy picks at half the head's bytes

    def dense(self, name: str) -> np.ndarray:
        """Weight `name` as a float32 array (a quantized matrix dequantized: the values the kernels use)."""
        return as_dense(self.weights[name])

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
            for i in range(self.config.n_layer):
                x = block(x, self.weights, i, self.config, segments, cos, sin, self.path, trace)  # [rows, n_embd]
        return x

    def _threads(self):
        if self.quantized:
            return kernels.blas_single_thread()
        return contextlib.nullcontext()

    @property
    def quantized(self) -> bool:
        """Whether the matrices are held for the C kernels (then `forward` runs them)."""
        return any(isinstance(w, KernelMatrix) for w in self.weights.values())

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return lm_head(hidden, self.weights, self.config)  # [rows, n_embd] -> [rows, vocab]

    def greedy_tokens(self, hidden: np.ndarray) -> np.ndarray | None:
        """argmax of `logits(hidden)` per row, without the full head product; None when no screen applies."""
        if self.head_screen is None:
            return None
        return self.head_screen.argmax(final_norm(hidden, self.weights, self.config))  # [rows, n_embd] -> [rows]

    def stages(self, layer: int = 0) -> "LlamaStages":
        return LlamaStages(self, layer)

    def with_path(self, path: str) -> "Llama":
        """The same model (same weight objects) running decode steps on another path (base.PATHS)."""
        other = copy.copy(self)
        other.path = choose_path(path, [self.weights[f"blk.{i}.{n}"] for i in range(self.config.n_layer)
                                        for n in _BLOCK_MATRICES])
        return other


class LlamaStages:
    """Block stages run alone on given inputs (the validator's isolated checkpoints).

    Each method calls the same stage function the forward pass uses."""

    def __init__(self, model: Llama, layer: int = 0):
        self.m, self.i = model, layer
        self.w, self.cfg = model.weights, model.config
        self.p = f"blk.{layer}."

    def norm_1(self, x):  # [seq, n_embd] -> [seq, n_embd]
        return rms_norm(x, self.w[self.p + "attn_norm.weight"], self.cfg.rms_norm_eps)

    def qkv(self, h, start: int = 0):  # [seq, n_embd] -> [seq, H, hd], 2 × [seq, Hkv, hd]
        cos, sin = self.m.rope.rows(np.arange(start, start + h.shape[0]))  # 2 × [seq, hd]
        w, p = self.w, self.p
        return qkv_projection(h, w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"],
                              self.cfg.n_head, self.cfg.n_kv_head, cos, sin)

    def scores(self, q, k, start: int = 0):  # [n, H, hd], [Hkv, T, hd] -> [H, n, T]
        return attention_scores(q, k, start)

    def attn_out(self, scores, v):  # [H, n, T], [Hkv, T, hd] -> [n, n_embd]
        return attention_output(scores, v, self.w[self.p + "attn_output.weight"])

    def ffn(self, h):  # [seq, n_embd] -> [seq, n_embd]
        w, p = self.w, self.p
        return ffn(h, w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"])

    def block(self, x):  # [seq, n_embd] -> [seq, n_embd], with a scratch cache
        cache = self.m.new_cache(x.shape[0])
        positions = np.arange(x.shape[0])
        cos, sin = self.m.rope.rows(positions)  # 2 × [seq, hd]
        return block(x, self.w, self.i, self.cfg, [Segment(cache, 0, x.shape[0])], cos, sin, self.m.path)


# ---------------------------------------------------------------- loading


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's rotary-permuted Q/K rows back into the HF layout.

    llama.cpp's converter writes W_gguf = W_hf.reshape(h, 2, d/2, in).swapaxes(1, 2); its inverse,
    as transformers applies it, is W_hf = W_gguf.reshape(h, d/2, 2, in).swapaxes(1, 2), i.e.
    W_hf = W_gguf[order] with the order below."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)  # [n_rows]


_BLOCK_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
_OPTIONAL_GLOBAL = ("output.weight", "rope_freqs.weight")


def _expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    hd = c.head_dim
    return {
        "attn_norm.weight": (c.n_embd,), "ffn_norm.weight": (c.n_embd,),
        "attn_q.weight": (c.n_head * hd, c.n_embd), "attn_k.weight": (c.n_kv_head * hd, c.n_embd),
        "attn_v.weight": (c.n_kv_head * hd, c.n_embd), "attn_output.weight": (c.n_embd, c.n_head * hd),
        "ffn_gate.weight": (c.n_ff, c.n_embd), "ffn_up.weight": (c.n_ff, c.n_embd), "ffn_down.weight": (c.n_embd, c.n_ff),
    }


def load_llama(f, quantized: bool | None = None, path: str | None = None) -> Llama:
    """A Llama from an open GGUFFile: config from metadata. With the C kernels (unless `quantized=False`
    or LLORCH_KERNELS=numpy), Q4_1/Q8_0/Q4_0/Q5_0 matrices are kept quantized (`QuantMatrix`, products computed
    on the stored blocks) and other matrices packed (`PackedMatrix`: F16 as float16, others dequantized
    to float32); without them every tensor is a float32 array."""
    cfg = LlamaConfig.from_gguf(f)
    if quantized is None:
        quantized = kernels.enabled()
    quantized = quantized and kernels.available()
    known = {"token_embd.weight", "output_norm.weight", *_OPTIONAL_GLOBAL}
    known |= {f"blk.{i}.{t}" for i in range(cfg.n_layer) for t in _BLOCK_TENSORS}
    extra = [n for n in f.tensor_names() if n not in known]
    if extra:
        raise ModelLoadError(f"{f.path}: tensor {extra[0]!r:.80} is not part of the Llama architecture this loader runs "
                             f"({len(extra)} such tensors; refusing to ignore weights)")
    shapes = _expected_shapes(cfg)
    weights: dict = {}

    def load(name: str, shape: tuple[int, ...], rows: np.ndarray | None = None):
        info = f.info(name)  # ModelLoadError names a missing tensor
        if info.shape != shape:
            raise ModelLoadError(f"{f.path}: tensor {name!r} has shape {info.shape}, expected {shape} from the metadata")
        if quantized and len(shape) == 2 and info.type_name in kernels.QUANT_TYPES:
            try:
                return QuantMatrix.from_blocks(info.type_name, f.raw(name), shape, row_order=rows)
            except ValueError:  # a Q4_0 scale that cannot be rewritten: packed as float32 below
                pass
        keep16 = quantized and len(shape) == 2 and info.type_name == "F16"
        w = f.tensor(name, np.float16 if keep16 else np.float32)  # ModelLoadError names an undecodable type
        w = w if rows is None else w[rows]
        if quantized and len(shape) == 2:  # [out, in] -> [C, in, 16]; F16 / BF16 kept at 16 bits
            return PackedMatrix.from_dense(w, storage="bfloat16" if info.type_name == "BF16" else w.dtype)
        return np.ascontiguousarray(w)

    weights["token_embd.weight"] = load("token_embd.weight", (cfg.vocab_size, cfg.n_embd))
    weights["output_norm.weight"] = load("output_norm.weight", (cfg.n_embd,))
    if "output.weight" in f:
        weights["output.weight"] = load("output.weight", (cfg.vocab_size, cfg.n_embd))
    order = {}
    q_order = unpermute_rows(cfg.n_head * cfg.head_dim, cfg.n_head)
    k_order = unpermute_rows(cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head)
    for i in range(cfg.n_layer):
        for t in _BLOCK_TENSORS:
            name = f"blk.{i}.{t}"
            rows = {"attn_q.weight": q_order, "attn_k.weight": k_order}.get(t)
            weights[name] = load(name, shapes[t], rows)
            if rows is not None:
                order[name] = rows
        for group in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")):  # same input: one kernel call
            names = [f"blk.{i}.{t}.weight" for t in group]
            kind = type(weights[names[0]])
            if kind in (QuantMatrix, PackedMatrix) and all(type(weights[n]) is kind for n in names):
                views = kind.fuse([weights[n] for n in names])
                if views is not None:
                    weights.update(zip(names, views))
        f.release_pages()  # this layer's file pages are copied: don't let them pile up in RSS
    freq_factors = None
    if "rope_freqs.weight" in f:
        freq_factors = load("rope_freqs.weight", (cfg.head_dim // 2,))
    rope = RopeTables(cfg.head_dim, cfg.rope_base, min(cfg.n_ctx, 8192), cfg.rope_linear_factor, freq_factors)
    f.release_pages()  # every weight is copied out of the mapping: its pages need not stay resident
    return Llama(cfg, weights, rope=rope, gguf=f, qk_row_order=order, path=path)
