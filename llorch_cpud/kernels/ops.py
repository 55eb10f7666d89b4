"""The operations model code calls, for any kind of weight: a float32 numpy array `[out, in]`, a
`QuantMatrix` (ggml Q4_1/Q8_0 blocks) or a `PackedMatrix` (float32/float16, row-interleaved) - plus the
batched decode attention and the BLAS thread limit that goes with the C kernels."""

from __future__ import annotations

import contextlib

import numpy as np

from llorch_cpud.kernels.packed import PackedMatrix
from llorch_cpud.kernels.quantized import QuantMatrix, _qkernels

KernelMatrix = (QuantMatrix, PackedMatrix)

_controller = None


def blas_single_thread():
    """Context manager: numpy's BLAS limited to one thread inside (threadpoolctl), so it does not spin
    against the kernels' OpenMP threads; restored on exit. ~7 µs per use."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        except Exception:  # pragma: no cover - threadpoolctl is a dependency
            _controller = False
    if not _controller:
        return contextlib.nullcontext()
    return _controller.limit(limits=1, user_api="blas")


def linear(x: np.ndarray, weight) -> np.ndarray:
    """x @ weight.T for a float32 `[n_out, n_in]` array, a QuantMatrix or a PackedMatrix: [rows, n_in] -> [rows, n_out]."""
    if isinstance(weight, KernelMatrix):
        return weight.matmul(x)
    return x @ weight.T


def fused_parent(weights):
    """The fused matrix whose parts, in order, are `weights` (QuantMatrix.fuse, PackedMatrix.fuse), or None."""
    first = weights[0]
    if not isinstance(first, KernelMatrix) or first.parent is None:
        return None
    fused, row = first.parent[0], 0
    for w in weights:
        if not isinstance(w, KernelMatrix) or w.parent is None or w.parent[0] is not fused or w.parent[1] != row:
            return None
        row += w.shape[0]
    return fused if row == fused.shape[0] else None


def linear_many(x: np.ndarray, weights) -> list[np.ndarray]:
    """[x @ w.T for w in weights]: one kernel call when the weights are, in order, the parts of one
    fused QuantMatrix (`QuantMatrix.fuse`); otherwise one product each. Same values either way."""
    fused = fused_parent(weights)
    if fused is None:
        return [linear(x, w) for w in weights]
    y = fused.matmul(x)  # [rows, Σ n_out]
    parts, c = [], 0
    for w in weights:
        parts.append(y[:, c : c + w.shape[0]])  # [rows, n_out] views
        c += w.shape[0]
    return parts


def decode_attention(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, keys: list, values: list,
                     lengths: list[int], out: np.ndarray | None = None, scores: np.ndarray | None = None) -> np.ndarray:
    """One new query row per sequence: its K/V row written into the sequence's cache at position
    length-1 (what `cache_write` does), then attention over the cached positions - the math of
    `attention_scores` + `attention_heads` for a single row (the causal mask is then just the length),
    in one C call for the whole batch instead of ~12 numpy calls per sequence.

    q [B, H, hd]; k_new, v_new [B, Hkv, hd]; keys[b], values[b]: [Hkv, max_seq_b, hd] (one layer of a
    KVCache, float32 or float16 - all the same); lengths[b] = T_b -> [B, H·hd]. A float16 cache stores the
    new row rounded to nearest even, as cache_write's assignment does. tests/test_kernels.py holds it to the
    numpy functions. `out`: a C-contiguous float32 [B, H·hd] to write into (else a new array). `scores`: None, or
    a float32 [B, H, >= max T_b] that receives each row's scaled scores before the softmax (a traced step)."""
    B, n_head, head_dim = q.shape
    if out is None:
        out = np.empty((B, n_head * head_dim), np.float32)  # [B, H·hd]
    elif out.shape != (B, n_head * head_dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"decode_attention: out must be a C-contiguous float32 [{B}, {n_head * head_dim}]")
    f32 = np.float32
    f16 = keys[0].dtype == np.float16  # the kernel checks every K/V buffer's format against it
    _qkernels.attend_decode(np.ascontiguousarray(q, dtype=f32), np.ascontiguousarray(k_new, dtype=f32),
                            np.ascontiguousarray(v_new, dtype=f32), keys, values, lengths, out,
                            n_head, keys[0].shape[0], head_dim, f16, scores)
    return out


def scores_buffer(batch: int, n_head: int, lengths: list[int]) -> np.ndarray:
    """A traced decode step's scores [B, H, max T_b], NaN where a row has fewer positions."""
    return np.full((batch, n_head, max(lengths)), np.nan, np.float32)


def as_dense(weight) -> np.ndarray:
    """A float32 `[out, in]` array for any kind of weight (kernel matrices unpacked; arrays unchanged)."""
    return weight.dequantize() if isinstance(weight, KernelMatrix) else weight


def take_rows(weight, ids: np.ndarray) -> np.ndarray:
    """weight[ids] for any kind of weight (an embedding lookup)."""
    return weight.rows(ids) if isinstance(weight, KernelMatrix) else weight[ids]


# ---- elementwise stages on the C kernels (a decode step's numpy calls cost more than their arithmetic)
# Each computes its model's stage function of the same name to float32 rounding (tests/test_kernels.py);
# the models call them in place of those when `fast` (kernel weights, no validation trace), as they
# call decode_attention.


RMS_NORM, LAYER_NORM, SILU_MUL, GELU_NEW, ROPE = range(5)  # kernels/c/rowwise.c's ops


def _rows(x: np.ndarray) -> np.ndarray:
    """x as float32 rows the kernels read: C-contiguous, or a column slice of a C-contiguous product."""
    if x.dtype != np.float32 or x.ndim != 2 or x.strides[1] != 4:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """llama.rms_norm: [rows, n] -> [rows, n]."""
    x = _rows(x)
    out = np.empty(x.shape, np.float32)  # [rows, n]
    _qkernels.rowwise(RMS_NORM, x, _rows(weight[None]), None, out, x.shape[0], x.shape[1], 0, eps, 0.0)
    return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """gpt2.layer_norm: [rows, n] -> [rows, n]."""
    x = _rows(x)
    out = np.empty(x.shape, np.float32)  # [rows, n]
    _qkernels.rowwise(LAYER_NORM, x, _rows(weight[None]), _rows(bias[None]), out, x.shape[0], x.shape[1], 0, eps, 0.0)
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """llama.silu(gate) * up: 2 × [rows, n_ff] -> [rows, n_ff]."""
    gate, up = _rows(gate), _rows(up)
    out = np.empty(gate.shape, np.float32)  # [rows, n_ff]
    _qkernels.rowwise(SILU_MUL, gate, up, None, out, gate.shape[0], gate.shape[1], 0, 0.0, 0.0)
    return out


def gelu_new(x: np.ndarray, c: float, k: float) -> np.ndarray:
    """gpt2.gelu_new (constants c = sqrt(2/pi), k = 0.044715 passed by the model): [rows, n] -> [rows, n]."""
    x = _rows(x)
    out = np.empty(x.shape, np.float32)  # [rows, n]
    _qkernels.rowwise(GELU_NEW, x, None, None, out, x.shape[0], x.shape[1], 0, c, k)
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """llama.apply_rope: x [rows, n_head, hd] (heads of a column slice of the QKV product are fine),
    cos, sin [rows, hd] -> [rows, n_head, hd]."""
    rows, n_head, hd = x.shape
    x = _rows(x.reshape(rows, n_head * hd))  # a view when the heads are contiguous within a row
    out = np.empty((rows, n_head, hd), np.float32)  # [rows, H, hd]
    _qkernels.rowwise(ROPE, x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), out.reshape(rows, -1), rows,
                      n_head * hd, hd, 0.0, 0.0)
    return out


class DecodeBlock:
    """A pre-norm block's decode step - one row per sequence - prepared once from its weights, run as one C call:
    the norm, the Q/K/V products, rope, the cache write and attention (decode_attention), the output product and
    residual, the norm, the up products and activation, down and residual: the functions of this module, in the
    order the models' `block` calls them, so the result is bit-identical to calling them one by one
    (tests/test_decode_block.py). The weights' kernel arguments are built here, once; a call passes only the
    activations, the caches and the positions.

    Llama: RMSNorm, up = [gate, up] with silu(gate) * up, rotary at each call. GPT-2: `norm_biases` (ln_1, ln_2
    biases: LayerNorm), `biases` of the (fused) qkv, o, up and down products (Conv1D), up = [c_fc] with gelu_new,
    `gelu` = its constants (c, k), no rotary."""

    def __init__(self, attn_norm: np.ndarray, qkv: list, o, ffn_norm: np.ndarray, up: list, down, n_head: int,
                 n_kv_head: int, head_dim: int, eps: float, *, norm_biases=(None, None),
                 biases=(None, None, None, None), gelu: tuple[float, float] | None = None):
        parts = lambda ws: (f.kernel_args(),) if (f := fused_parent(ws)) is not None else tuple(w.kernel_args() for w in ws)  # noqa: E731
        (b_qkv, b_o, b_up, b_down), (b_an, b_fn) = biases, norm_biases
        self.weights = (_vec(attn_norm), _vec(b_an), parts(qkv), _vec(b_qkv), o.kernel_args(), _vec(b_o),
                        _vec(ffn_norm), _vec(b_fn), parts(up), _vec(b_up), down.kernel_args(), _vec(b_down))
        self.n_head, self.n_kv_head, self.head_dim, self.n_ff, self.eps = n_head, n_kv_head, head_dim, up[0].shape[0], eps
        self.activation = (0, 0.0, 0.0) if gelu is None else (1, *gelu)  # silu(gate)·up, or gelu_new(c, k)

    def __call__(self, x: np.ndarray, cos: np.ndarray | None, sin: np.ndarray | None, caches: list,
                 lengths: list[int], layer: int, trace: dict | None = None) -> np.ndarray:
        """x [B, n_embd] (not modified); cos, sin [B, head_dim] (None without rotary); caches[b]: sequence b's
        KVCache, whose layer `layer` gets the row's K, V at lengths[b] - 1 -> [B, n_embd].

        `trace`: a dict that receives the stage tensors this very call computes (copied out by the C code as it
        goes; the result is bit-identical either way): ln_1, q [B, H, hd] (after rotary), k, v [B, Hkv, hd],
        scores [B, H, max T_b] (scaled, before the softmax; NaN past a row's length), attn_out, ln_2, ffn_out."""
        x = np.array(x, dtype=np.float32, order="C")  # [B, n_embd] the block writes its output here
        f16 = caches[0].k.dtype == np.float16
        buffers = None
        if trace is not None:
            B, E = x.shape
            H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
            shapes = {"ln_1": (B, E), "q": (B, H, hd), "k": (B, Hkv, hd), "v": (B, Hkv, hd), "attn_out": (B, E),
                      "ln_2": (B, E), "ffn_out": (B, E)}
            trace.update({name: np.empty(shape, np.float32) for name, shape in shapes.items()})
            trace["scores"] = scores_buffer(B, H, lengths)
            buffers = tuple(trace[n] for n in ("ln_1", "q", "k", "v", "scores", "attn_out", "ln_2", "ffn_out"))
        _qkernels.decode_block(x, *self.weights, _vec(cos), _vec(sin), [c.k for c in caches], [c.v for c in caches],
                               lengths, layer, self.n_head, self.n_kv_head, self.head_dim, self.n_ff, self.eps, f16,
                               *self.activation, buffers)
        return x


def _vec(v):
    return None if v is None else np.ascontiguousarray(v, dtype=np.float32)


def decode_block(x: np.ndarray, attn_norm: np.ndarray, qkv: list, o, ffn_norm: np.ndarray, up: list, down,
                 cos: np.ndarray | None, sin: np.ndarray | None, caches: list, lengths: list[int], layer: int,
                 n_head: int, n_kv_head: int, head_dim: int, eps: float, *, norm_biases=(None, None),
                 biases=(None, None, None, None), gelu: tuple[float, float] | None = None,
                 trace: dict | None = None) -> np.ndarray:
    """DecodeBlock prepared and called once (the tests' form): [B, n_embd] -> [B, n_embd]."""
    block = DecodeBlock(attn_norm, qkv, o, ffn_norm, up, down, n_head, n_kv_head, head_dim, eps,
                        norm_biases=norm_biases, biases=biases, gelu=gelu)
    return block(x, cos, sin, caches, lengths, layer, trace)
