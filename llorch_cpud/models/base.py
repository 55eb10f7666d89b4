"""What every model family offers the engine and the validator.

A forward pass works on a batch of *rows* (token positions) that may belong to several
sequences. A `Segment` says which consecutive rows belong to one sequence, which cache
they use and at which position they start. Prefill of one prompt is one segment of n rows;
batched decode of several requests is several segments of one row each. The row-wise
matrix products (projections, FFN, head) run once over all rows; attention runs per segment.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from llorch_cpud.cache import KVCache
from llorch_cpud.kernels.ops import KernelMatrix, blas_single_thread, decode_attention, scores_buffer


@dataclass
class Segment:
    cache: KVCache
    start: int  # absolute position of the first row of this segment
    length: int  # number of rows


class Model(Protocol):
    """What the engine, the server and the validator use of a model (models/gpt2.py, models/llama.py)."""

    family: str  # "gpt2" | "llama"
    config: object  # the family's config dataclass (GPT2Config, LlamaConfig)
    weights: object  # the family's weights dataclass (GPT2Weights, LlamaWeights): one field per checkpoint tensor
    n_ctx: int  # longest sequence the model supports
    vocab_size: int
    eos_token_id: int | None
    numerics: str  # how quantized products treat activations (kernels.quantized.NUMERICS), fixed at load
    path: str  # how decode steps run (PATHS), chosen when the model is built
    quantized: bool  # whether the matrices are held for the C kernels (packed or quantized)

    def new_cache(self, max_seq: int) -> KVCache: ...

    def forward(self, tokens: np.ndarray, segments: list[Segment], trace: dict | None = None) -> np.ndarray:
        """[rows] token ids -> [rows, n_embd] final hidden states (before the final norm).

        Writes K/V of every row into its segment's cache. When `trace` is a dict, the block-0 stage
        tensors of every row are stored in it by checkpoint name ("scores": one per segment), as the
        path that runs computes them: tracing never changes the path or the numbers."""
        ...

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """[rows, n_embd] -> [rows, vocab]: final norm and LM head."""
        ...

    def greedy_tokens(self, hidden: np.ndarray) -> np.ndarray | None:
        """[rows, n_embd] -> [rows]: argmax of `logits(hidden)` per row, exactly, without the full head
        product (kernels.screen); None when the head has no screen (then the engine takes the logits)."""
        ...

    def with_path(self, path: str) -> "Model":
        """The same model (the same weight objects) running decode steps on another path (PATHS)."""
        ...

    def stages(self, layer: int = 0):
        """Block `layer`'s stage functions on given inputs (the validator's isolated checkpoints)."""
        ...

    def tensors(self) -> dict[str, object]:
        """Every weight by its checkpoint name (as the loader's name table gives them), held as the model holds it."""
        ...

    def tensor_slot(self, name: str) -> tuple[object, str]:
        """(object, field) holding the weight of checkpoint name `name`: getattr/setattr on them reads/replaces it."""
        ...

    def dense(self, name: str) -> np.ndarray:
        """The weight of checkpoint name `name` as the checkpoint's float32 array (kernel matrices unpacked)."""
        ...


# ---------------------------------------------------------------- weights by checkpoint name

#: A format's name table: checkpoint tensor name -> weights field. "{i}" in a name stands for the block index, and
#: such a name maps to a field of `weights.blocks[i]`; any other to a field of the weights object itself.
NameTable = dict[str, str]


class BlockWeights:
    """Base of a family's block weights dataclass. It holds the block's prepared decode kernel
    (kernels.ops.DecodeBlock, built once from the weights by the family's `decode_kernel`); replacing any weight
    (the validator's injected bugs do) drops it, so the next decode step prepares it from what the block holds."""

    decode = None  # the prepared kernels.ops.DecodeBlock, or None

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name != "decode":
            object.__setattr__(self, "decode", None)


def expand_names(table: NameTable, n_layer: int) -> dict[str, tuple[int | None, str]]:
    """Every checkpoint name of a model with `n_layer` blocks -> (block index or None, field)."""
    out: dict[str, tuple[int | None, str]] = {}
    for pattern, field in table.items():
        if "{i}" in pattern:
            out.update({pattern.format(i=i): (i, field) for i in range(n_layer)})
        else:
            out[pattern] = (None, field)
    return out


class NamedWeights:
    """`tensors`, `tensor_slot`: a model's weights looked up by checkpoint name through the name table the loader
    built it with (`self.names`, expand_names' output). The math never uses names; the validator and tests do."""

    names: dict[str, tuple[int | None, str]]
    weights: object

    def tensor_slot(self, name: str) -> tuple[object, str]:
        if name not in self.names:
            raise KeyError(f"no tensor {name!r} in this {type(self).__name__}")
        i, field = self.names[name]
        return (self.weights if i is None else self.weights.blocks[i]), field

    def tensors(self) -> dict[str, object]:
        held = {name: getattr(*self.tensor_slot(name)) for name in self.names}
        return {name: w for name, w in held.items() if w is not None}  # an optional tensor the file lacks


class Decoder(NamedWeights):
    """What the families' model classes share: the decode path and its prepared kernels, the BLAS thread limit.
    A family sets `weights` (its blocks have `matrices()`), `config` and `path` (choose_path) in its __init__,
    then calls `_prepare(decode_kernel)`."""

    config: object

    def _matrices(self) -> list:
        return [m for b in self.weights.blocks for m in b.matrices()]

    def _prepare(self, decode_kernel) -> None:
        """On the fused path, each block's decode kernel prepared now, at load (the family's decode_kernel)."""
        if self.path == "fused":
            for blk in self.weights.blocks:
                decode_kernel(blk, self.config)

    def with_path(self, path: str):
        """The same model (same weight objects) running decode steps on another path (PATHS)."""
        other = copy.copy(self)
        other.path = choose_path(path, self._matrices())
        return other

    @property
    def quantized(self) -> bool:
        """Whether the matrices are held for the C kernels (then `forward` keeps numpy's BLAS on one thread)."""
        return any(isinstance(w, KernelMatrix) for w in self._matrices())

    def _threads(self):
        """The C kernels own the cores while they run: numpy's BLAS stays on one thread."""
        return blas_single_thread() if self.quantized else contextlib.nullcontext()

    def greedy_tokens(self, hidden: np.ndarray) -> np.ndarray | None:
        """argmax of `logits(hidden)` per row, without the full head product; None when no screen applies."""
        if self.head_screen is None:
            return None
        return self.head_screen.argmax(self.final_norm(hidden))  # [rows, n_embd] -> [rows]


def build_weights(names: dict, tensors: dict, weights_cls, block_cls, n_layer: int):
    """A family's weights dataclass from tensors by checkpoint name, through the expanded name table `names`
    (checkpoint name -> (block, field)); a name the tensors lack is None (an optional tensor)."""
    top: dict = {}
    blocks: list[dict] = [{} for _ in range(n_layer)]
    for name, (i, field) in names.items():
        (top if i is None else blocks[i])[field] = tensors.get(name)
    return weights_cls(**top, blocks=[block_cls(**b) for b in blocks])


def weight_values(weights) -> list:
    """Every tensor of a weights dataclass (its blocks' too), in field order; None fields left out."""
    out = []
    for f in fields(weights):
        value = getattr(weights, f.name)
        if f.name == "blocks":
            out += [v for b in value for v in weight_values(b)]
        elif value is not None and not isinstance(value, (int, float, str, bool)):
            out.append(value)
    return out


#: How a model runs its blocks, chosen when the model is built (`Model.path`):
#:   fused   a decode step (every segment one row) runs each block as one prepared C call (kernels.ops.DecodeBlock) -
#:           the default with the C extension; any other step (a prefill, alone or beside decode rows) runs
#:           as `stages` does
#:   stages  each block as its kernels.ops C calls one by one (the same numbers as fused, bit for bit); a prefill
#:           segment's attention runs the numpy stage functions (per sequence), one-row segments' one C call
#:   numpy   the numpy stage functions - the path without the C extension (weights held as float32 arrays)
#: On the C paths every row's result is independent of the other rows of its step (the kernels sum each row
#: in a fixed order), so a sequence's numbers do not depend on what it is batched with; numpy's BLAS sums in
#: an order that depends on the number of rows, so on the numpy path they may, in the last bits.
PATHS = ("fused", "stages", "numpy")
PATH_NAMES = {"fused": "fused C block", "stages": "per-stage C ops", "numpy": "numpy stage functions"}


def choose_path(path: str | None, matrices) -> str:
    """The decode path a model is built with: `path` (None: fused when every matrix is held for the C kernels,
    else numpy). fused and stages need kernel-held matrices."""
    kernel = all(isinstance(m, KernelMatrix) for m in matrices)
    if path is None:
        return "fused" if kernel else "numpy"
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, not {path!r}")
    if path != "numpy" and not kernel:
        raise ValueError(f"path {path!r} needs the matrices held for the C kernels (this model's are numpy arrays)")
    return path


def step_path(path: str, segments: list[Segment]) -> str:
    """How one forward runs its blocks: fused only in a decode step (every segment one row), else stages (PATHS)."""
    if path == "fused" and any(s.length > 1 for s in segments):
        return "stages"
    return path


def causal_mask(start: int, n: int, total: int) -> np.ndarray:
    """True where query row i (absolute position start+i) must not see key j."""
    return np.arange(total)[None, :] > (start + np.arange(n))[:, None]  # [n, total]


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # [..., T]
    return e / e.sum(axis=-1, keepdims=True)  # [..., T]


def attend_segments(q, k, v, segments: list[Segment], layer: int, merged: np.ndarray, c_attention: bool, trace,
                    cache_write, cache_read, attention_scores, attention_heads) -> np.ndarray:
    """Attention of every segment over its own KV cache, heads merged into `merged` [rows, H·hd].

    q [rows, H, hd], k, v [rows, Hkv, hd]: the batched projections of all segments' rows. With `c_attention`
    (the model's path is not numpy) every row of every segment - a prefill's rows as much as a decode row -
    goes through one C call (kernels.ops.decode_attention), which writes the rows' K/V into their caches first
    and then attends each row over its own causal prefix: the keys are read tile by tile with a running
    per-row softmax scratch of T floats, so no [H, n, T] matrix exists, and each row's numbers are the same
    whether it is prefilled in one pass, in chunks, or decoded. On the numpy path each segment writes its
    K/V, reads its cache and runs the model's stage functions (passed by the model module at each call, so
    the validator's injected bugs, which replace them there, take effect). A trace records each segment's
    scores [H, n, T] (masked positions -inf, as attention_scores gives them)."""
    seg_scores: list = [None] * len(segments)
    if c_attention:
        _attend_rows_c(q, k, v, segments, layer, merged, seg_scores if trace is not None and layer == 0 else None)
    else:
        row = 0
        for j, seg in enumerate(segments):  # attention is per sequence (its own cache); the projections are batched
            rows = slice(row, row + seg.length)
            cache_write(seg.cache, layer, seg.start, k[rows], v[rows])
            k_all, v_all = cache_read(seg.cache, layer, seg.start + seg.length)  # 2 × [Hkv, T, hd]
            scores = attention_scores(q[rows], k_all, seg.start)  # [H, n, T]
            if trace is not None and layer == 0:
                seg_scores[j] = scores.copy()
            merged[rows] = attention_heads(scores, v_all)  # [n, H·hd]
            row += seg.length
    trace_put(trace, layer, "scores", seg_scores)
    return merged


def _attend_rows_c(q, k, v, segments: list[Segment], layer: int, merged: np.ndarray, seg_scores: list | None):
    """Every row of every segment as one row of the C attention: row i of a segment starting at `start`
    attends over positions [0, start + i] of its cache (the kernel writes all rows' K/V before any row reads)."""
    keys, values, lengths = [], [], []
    for seg in segments:
        keys += [seg.cache.k[layer]] * seg.length
        values += [seg.cache.v[layer]] * seg.length
        lengths += range(seg.start + 1, seg.start + seg.length + 1)
    scores = scores_buffer(len(lengths), q.shape[1], lengths) if seg_scores is not None else None
    decode_attention(q, k, v, keys, values, lengths, out=merged, scores=scores)  # [rows, H, hd] -> [rows, H·hd]
    if scores is None:
        return
    row = 0
    for j, seg in enumerate(segments):
        end = seg.start + seg.length
        s = scores[row : row + seg.length, :, :end].transpose(1, 0, 2).copy()  # [n, H, T] -> [H, n, T]
        s[:, np.arange(end)[None, :] > (seg.start + np.arange(seg.length))[:, None]] = -np.inf  # the causal mask
        seg_scores[j] = s
        row += seg.length


def trace_decode_block(trace: dict | None, layer: int, x_in: np.ndarray, stages: dict, out: np.ndarray,
                       segments: list[Segment]) -> None:
    """Record what a fused decode block computed (kernels.ops.DecodeBlock's trace) under the names a traced
    block uses: the same tensors the stage path records, taken from the compiled block itself."""
    if trace is None or layer != 0:
        return
    trace_put(trace, layer, "block_in", x_in)
    for name in ("ln_1", "q", "k", "v", "attn_out", "ln_2", "ffn_out"):
        trace_put(trace, layer, name, stages[name])
    trace_put(trace, layer, "scores", [stages["scores"][b, :, None, : s.start + 1] for b, s in enumerate(segments)])
    trace_put(trace, layer, "block_out", out)


def trace_put(trace: dict | None, layer: int, name: str, value) -> None:
    """Record a block-0 stage tensor of every row for validation (a copy, so later in-place work cannot change
    it). "scores" is a list, one [H, n, T] per segment."""
    if trace is not None and layer == 0:
        trace[name] = value.copy() if isinstance(value, np.ndarray) else value
