"""The interface every reference implementation offers the checkpoint harness.

A reference runs the *same weights* on the *same token ids* in its own framework and hands
back numpy arrays. Tensor names and layouts (block 0, batch axis dropped):

    block_in   [seq, n_embd]            input of block 0 (token + position embeddings for GPT-2)
    ln_1       [seq, n_embd]            first norm of block 0 (LayerNorm / RMSNorm)
    q          [seq, n_head, head_dim]  (after RoPE for Llama)
    k, v       [seq, n_kv_head, head_dim]
    scores     [n_head, seq, seq]       Q·Kᵀ·scale + causal mask, before softmax
    attn_out   [seq, n_embd]            attention block output (after the output projection)
    ln_2       [seq, n_embd]            second norm (input of the FFN)
    ffn_out    [seq, n_embd]
    block_out  [seq, n_embd]
    logits     [seq, vocab]

Adding a framework means one new module in this package that subclasses `Reference` and
registers itself in `REGISTRY` (see __init__.py); the checkpoint code does not change.

A reference that cannot expose something (llama.cpp has no API for block-0 tensors or its KV cache)
leaves those names out of `capture()` and raises `NotAvailable` from `cache()`: the checkpoints that
need them are reported "n/a" (not compared, not a failure), with the reason. A reference whose
numerics differ from float32 by design declares that in `tolerances` (checkpoint id -> tolerance
used instead of SPEC's, with `tolerance_reason`), which the report shows next to SPEC's value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class CacheSnapshot:
    """Layer-0 K/V the reference holds in its cache: [n_kv_head, T, head_dim] each."""

    k_prompt: np.ndarray
    v_prompt: np.ndarray
    k_step: np.ndarray  # after feeding one more token
    v_step: np.ndarray


class ReferenceUnavailable(Exception):
    """The framework is not installed or cannot run here; the message says why."""


class NotAvailable(Exception):
    """The reference cannot expose this quantity through its API; the checkpoint is reported "n/a"."""


class Reference(ABC):
    name: str = "?"
    # Declared tolerance profile: checkpoint id -> tolerance used for this reference instead of SPEC's
    # (only checkpoint 8 is meant here: it also sets the vs-reference part of 9 and the tie rules of 10
    # and 12). Empty for references that compute what we compute in float32 or better.
    tolerances: dict[int, float] = {}
    tolerance_reason: str = ""
    # Why capture() may lack block-0 tensors (shown with the "n/a" checkpoints); empty when it has them all.
    unavailable_reason: str = ""

    @abstractmethod
    def load(self, model_path: Path, family: str, engine) -> None:
        """Load the same weights. `engine` is ours (some references take weights from it)."""

    @abstractmethod
    def versions(self) -> dict[str, str]: ...

    @abstractmethod
    def capture(self, prompt_ids: list[int]) -> dict[str, np.ndarray]:
        """Run the prompt once and return the block-0 tensors and the logits named above."""

    @abstractmethod
    def cache(self, prompt_ids: list[int], next_token: int) -> CacheSnapshot: ...

    @abstractmethod
    def greedy(self, prompt_ids: list[int], n_tokens: int, eos_token_id: int | None) -> list[int]:
        """Greedy continuation with the reference's own KV-cached generation (stops at EOS)."""

    @abstractmethod
    def argmax(self, logits: np.ndarray) -> int: ...

    @abstractmethod
    def softmax(self, logits: np.ndarray, temperature: float) -> np.ndarray: ...

    def tokenization(self, text: str, ids: list[int]) -> str | None:
        """Optional: how the reference's own tokenizer encodes `text` compared with our `ids` (which are
        what every reference is fed). None when the reference has no tokenizer of its own to compare."""
        return None


def available_module(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ReferenceUnavailable(f"python package {name!r} is not installed")
