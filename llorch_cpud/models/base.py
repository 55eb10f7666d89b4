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


def trace_put(trace: dict | None, layer: int, name: str, value) -> None:
    """Record a block-0 stage tensor for validation (a copy, so later in-place work cannot change it)."""
    if trace is not None and layer == 0:
        trace[name] = value.copy() if isinstance(value, np.ndarray) else value
