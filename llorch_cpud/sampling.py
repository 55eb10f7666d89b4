"""Turning one row of logits into one token id.

Order: repetition penalty -> greedy (temperature < 1e-6) or temperature -> top-k -> softmax
-> top-p -> min-p -> draw from the seeded generator. Probabilities are computed in float64
so that a distribution sums to 1 to within 1e-12 before the draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llorch_cpud.errors import InvalidRequest

GREEDY_BELOW = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off

    def check(self) -> None:
        problems = []
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            problems.append(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 <= self.repetition_penalty <= 2.0:
            problems.append(f"repetition_penalty must be in [0, 2], got {self.repetition_penalty}")
        if problems:
            raise InvalidRequest("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def argmax(logits: np.ndarray) -> int:
    """Checkpoint 10. The first index of the largest logit (as torch.argmax and np.argmax)."""
    return int(np.argmax(logits))


def softmax_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Checkpoint 11. softmax(logits / T) in float64: [vocab] -> [vocab], sums to 1."""
    z = logits.astype(np.float64) / temperature  # [vocab]
    e = np.exp(z - z.max())  # [vocab]
    return e / e.sum()  # [vocab]


def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """CTRL-style penalty (as transformers): seen tokens' positive logits divided, negative multiplied."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    out = logits.copy()  # [vocab]
    seen = np.unique(np.asarray(history, dtype=np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_probs(probs: np.ndarray, params: SamplingParams) -> np.ndarray:
    """top-p then min-p on a probability vector: [vocab] -> [vocab], renormalised."""
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # most likely first
        cum = np.cumsum(probs[order])
        keep_n = int(np.searchsorted(cum, params.top_p, side="left")) + 1  # smallest set reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep_n]] = True
        probs = np.where(mask, probs, 0.0)
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history=()) -> int:
    """One token id from one row of logits [vocab]."""
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return argmax(logits)
    z = logits.astype(np.float64)
    if params.top_k > 0 and params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = filter_probs(softmax_probs(z, params.temperature), params)
    return int(rng.choice(probs.shape[0], p=probs))


def make_rng(seed: int) -> np.random.Generator:
    if not 0 <= seed < 2**64:
        raise InvalidRequest(f"seed must be a uint64, got {seed}")
    return np.random.Generator(np.random.PCG64(seed))
