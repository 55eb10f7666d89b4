"""What every model family offers the engine and the validator.

A forward pass works on a batch of *rows* (token positions) that may belong to several
sequences. A `Segment` says which consecutive rows belong to one sequence, which cache
they use and at which position they start. Prefill of one prompt is one segment of n rows;
batched decode of several requests is several segments of one row each. The row-wise
matrix products (projections, FFN, head) run once over all rows; attention runs per segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from llorch_cpud.cache import KVCache
from llorch_cpud.kernels.ops import KernelMatrix, decode_attention


@dataclass
class Segment:
    cache: KVCache
    start: int  # absolute position of the first row of this segment
    length: int  # number of rows


class Model(Protocol):
    family: str  # "gpt2" | "llama"
    n_ctx: int  # longest sequence the model supports
    vocab_size: int

    def new_cache(self, max_seq: int) -> KVCache: ...

    def forward(self, tokens: np.ndarray, segments: list[Segment], trace: dict | None = None) -> np.ndarray:
        """[rows] token ids -> [rows, n_embd] final hidden states (before the final norm).

        Writes K/V of every row into its segment's cache. When `trace` is a dict, the
        block-0 stage tensors of the first segment are stored in it by checkpoint name."""
        ...

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """[rows, n_embd] -> [rows, vocab]: final norm and LM head."""
        ...

    def greedy_tokens(self, hidden: np.ndarray) -> np.ndarray | None:
        """[rows, n_embd] -> [rows]: argmax of `logits(hidden)` per row, exactly, without the full head
        product (kernels.screen); None when the head has no screen (then the engine takes the logits)."""
        ...


def attend_segments(q, k, v, segments: list[Segment], layer: int, merged: np.ndarray, fast: bool, trace,
                    cache_write, cache_read, attention_scores, attention_heads) -> np.ndarray:
    """Attention of every segment over its own KV cache, heads merged into `merged` [rows, H·hd].

    q [rows, H, hd], k, v [rows, Hkv, hd]: the batched projections of all segments' rows. A segment of
    several rows (a prefill) writes its K/V, reads its cache and runs the model's stage functions; when
    `fast` (kernel weights, no trace), the one-row (decode) segments of every sequence go through one
    C call instead, which also writes their K/V. The stage functions are passed by the model module at
    each call, so the validator's injected bugs (which replace them there) take effect."""
    one_row: list[tuple[int, Segment]] = []
    row = 0
    for seg in segments:  # attention is per sequence (its own cache); the projections are batched
        rows = slice(row, row + seg.length)
        if fast and seg.length == 1:
            one_row.append((row, seg))  # its cache write happens in decode_attention
        else:
            cache_write(seg.cache, layer, seg.start, k[rows], v[rows])
            k_all, v_all = cache_read(seg.cache, layer, seg.start + seg.length)  # 2 × [Hkv, T, hd]
            scores = attention_scores(q[rows], k_all, seg.start)  # [H, n, T]
            if row == 0:
                trace_put(trace, layer, "scores", scores)
            merged[rows] = attention_heads(scores, v_all)  # [n, H·hd]
        row += seg.length
    if one_row:
        caches = ([s.cache.k[layer] for _, s in one_row], [s.cache.v[layer] for _, s in one_row],
                  [s.start + 1 for _, s in one_row])
        if len(one_row) == q.shape[0]:  # a decode step (every row one sequence's): no gather, no scatter
            decode_attention(q, k, v, *caches, out=merged)  # [B, H, hd] -> [B, H·hd]
        else:
            idx = [r for r, _ in one_row]
            merged[idx] = decode_attention(q[idx], k[idx], v[idx], *caches)  # [B, H, hd] -> [B, H·hd]
    return merged


def kernel_path(trace: dict | None, weight) -> bool:
    """Whether a block's one-row segments take the C decode attention: with kernel weights and no
    validation trace. A traced forward - the validator's stage checks, and the bugs it injects into the
    stage functions - runs the numpy stage functions; tests/test_kernels.py holds the paths to each other."""
    return trace is None and isinstance(weight, KernelMatrix)


FUSED_DECODE = True  # decode steps run each block as one C call (False: its kernels.ops calls one by one - same numbers)


def fused_block(fast: bool, matrices) -> bool:
    """Whether a decode-step block (`fast`: decode_step) runs as one C call, kernels.ops.decode_block: when
    FUSED_DECODE and every matrix of the block is kernel-held."""
    return fast and FUSED_DECODE and all(isinstance(m, KernelMatrix) for m in matrices)


def decode_step(trace: dict | None, weight, segments: list[Segment]) -> bool:
    """Whether a block runs its elementwise stages (norms, activation, RoPE) as the C calls of
    kernels.ops: in an untraced decode step with kernel weights (every segment one row), where numpy's
    per-call cost, not arithmetic, is their price. A prefill keeps the numpy stage functions, so the
    logits of a request's first token are bit-identical to the validator's traced forward of its prompt
    (checkpoint 9)."""
    return kernel_path(trace, weight) and all(s.length == 1 for s in segments)


def trace_put(trace: dict | None, layer: int, name: str, value) -> None:
    """Record a block-0 stage tensor for validation (a copy, so later in-place work cannot change it)."""
    if trace is not None and layer == 0:
        trace[name] = value.copy() if isinstance(value, np.ndarray) else value
