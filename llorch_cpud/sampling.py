"""Turning one row of logits into one token id.

Order: repetition penalty -> greedy (temperature < 1e-6) or temperature -> top-k -> softmax
-> top-p -> min-p -> draw from the seeded generator. Probabilities are computed in float64
so that a distribution sums to 1 to within 1e-12 before the draw.

Degenerate but allowed parameters have defined results, never a NaN:
- temperature below 1e-6 (0 included) is greedy: the argmax, ties to the lowest id;
- repetition_penalty below 1e-6 (0 included) acts as 1e-6: a seen token's positive logit is
  multiplied by a million (so the largest such token is all but certain to be picked), a seen
  token's negative logit becomes ~0;
- top_p 0 keeps only the most likely token (ties: the lowest id);
- min_p 1 keeps exactly the tokens whose probability equals the largest.
A row of logits holding a NaN or an infinity is an error (`ValueError`), not a token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llorch_cpud.errors import InvalidRequest

GREEDY_BELOW = 1e-6
MIN_REPETITION_PENALTY = 1e-6  # smaller penalties (0 included) act as this: no division by zero, no overflow


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
    z = np.array(logits, dtype=np.float64)  # [vocab] a copy, worked on in place (the same values as z / T ...)
    if temperature != 1.0:
        z /= temperature
    z -= z.max()
    np.exp(z, out=z)  # [vocab] exp(z - max)
    z /= z.sum()
    return z


def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """CTRL-style penalty (as transformers): seen tokens' positive logits divided, negative multiplied.
    A penalty below MIN_REPETITION_PENALTY acts as MIN_REPETITION_PENALTY (see the module docstring)."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    penalty = max(penalty, MIN_REPETITION_PENALTY)
    out = logits.copy()  # [vocab]
    seen = np.unique(np.asarray(history, dtype=np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_probs(probs: np.ndarray, params: SamplingParams) -> np.ndarray:
    """top-p then min-p on a probability vector: [vocab] -> [vocab], renormalised."""
    if params.top_p < 1.0:
        order = top_p_order(probs, params.top_p)  # most likely first, far enough to reach top_p
        cum = np.cumsum(probs[order])
        keep_n = int(np.searchsorted(cum, params.top_p, side="left")) + 1  # smallest set reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep_n]] = True
        probs = np.where(mask, probs, 0.0)
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


TOP_P_FIRST = 1024  # tokens sorted first for top-p; the whole vocabulary only when they hold less than top_p


def top_p_order(probs: np.ndarray, top_p: float) -> np.ndarray:
    """A prefix of the stable descending order of `probs` (ties by index, as np.argsort(-probs,
    kind="stable")) whose cumulative sum reaches top_p - usually a few hundred tokens, so only the
    largest TOP_P_FIRST, and every token tied with the smallest of them, are sorted."""
    if probs.shape[0] > 2 * TOP_P_FIRST:
        kth = np.partition(probs, -TOP_P_FIRST)[-TOP_P_FIRST]
        head = np.nonzero(probs >= kth)[0]  # ascending ids: the largest values, ties included
        order = head[np.argsort(-probs[head], kind="stable")]  # the full order's first len(head) entries
        cum = np.cumsum(probs[order])
        if cum.size and cum[-1] >= top_p:
            return order
    return np.argsort(-probs, kind="stable")


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """`rng.choice(len(probs), p=probs)` for non-negative probs: the same index for the same generator
    state (one uniform u; the first i with cumsum(p)[i] / sum > u), without choice's passes that check p
    and divide the whole cumulative sum."""
    cdf = np.cumsum(probs)  # [vocab]
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0):  # (a NaN anywhere makes the sum NaN)
        raise ValueError(f"probabilities must have a positive finite sum, got {total}")
    u = rng.random()
    lo, hi = 0, cdf.shape[0]  # binary search, dividing only the probed values (x / total is monotone in x)
    while lo < hi:
        mid = (lo + hi) // 2
        if float(cdf[mid]) / total > u:
            hi = mid
        else:
            lo = mid + 1
    return lo


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history=(),
           allowed: np.ndarray | None = None) -> int:
    """One token id from one row of logits [vocab]; ValueError if the row holds a NaN or an infinity.

    `allowed` [vocab] bool (structured output: the grammar's mask): every other token's logit becomes -inf
    after the repetition penalty, so greedy, top-k/top-p/min-p and the draw only ever see allowed tokens."""
    if not np.isfinite(logits).all():
        bad = np.flatnonzero(~np.isfinite(logits))
        raise ValueError(f"logits hold {bad.size} non-finite values (first: token {int(bad[0])} = {logits[bad[0]]})")
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if allowed is not None:
        if not allowed.any():
            raise ValueError("the grammar allows no token")
        logits = np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)  # [vocab]
    if params.greedy:
        return argmax(logits)
    z = logits
    if params.top_k > 0 and params.top_k < z.shape[0]:
        z = z.astype(np.float64)
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = filter_probs(softmax_probs(z, params.temperature), params)
    return draw(probs, rng)


def make_rng(seed: int) -> np.random.Generator:
    if not 0 <= seed < 2**64:
        raise InvalidRequest(f"seed must be a uint64, got {seed}")
    return np.random.Generator(np.random.PCG64(seed))
