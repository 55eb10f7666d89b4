"""Greedy picks from a float16 copy of a float32 head at half the bytes, and exactly the pick of
the full product.

A greedy step needs only `argmax(h @ W.T)`, yet the full product reads the whole head: for GPT-2
124M the tied `wte` is 154 MB of the 500 MB a token reads. `HeadScreen` keeps W' = W rounded to
float16 (77 MB) and, per output row j, norms of W's row and of the rounding `D = W - W'`, measured
at build time:

1. screen: `a = h @ W'.T` with the same kernel (float16 widened exactly, float32 sums);
2. bound:  `|a_j - e_j| <= B_j`, where `e_j` is the float32 value the full product gives. With
   `S(v) = sum_i |h_i| |v_i|` bounded by min(|h|_2 |v|_2, |h|_inf |v|_1, |h|_1 |v|_inf),
   `B_j = S(D_j) + gamma * (2 S(W_j) + S(D_j))`: the rounding of the weights, and each product's
   float32 summation error (gamma = n u / (1 - n u), u = 2^-24, n = n_in + 8);
3. the row k with the largest exact value has `a_k + B_k >= e_k >= e_m >= a_m - B_m` for every m, so
   every row with `a_j + B_j >= max_m (a_m - B_m)` is a candidate, and no other row can be the maximum;
4. rescore: the candidates' 16-row chunks go through the float32 kernel (a row's sum is independent
   of the other rows and chunks, so the values are bit-identical to the full product's), and the
   first index of the largest value is the pick, as `np.argmax` of the full logits.

Anything outside the argument (non-finite activations or values, a bound that leaves a quarter of
the vocabulary) falls back to the full product. Only a float32 head gains: a float16/bfloat16 head is
already 16-bit, and a coarser copy of a quantized head does not work - a 4-bit copy of SmolLM2's Q8_0
head was measured at errors up to 3.8 on logits whose top two were 4.2 apart, with rigorous bounds of
7-13 that left most of the vocabulary as candidates. The build goes a few hundred rows at a time (no
second float copy of the head).
"""

from __future__ import annotations

import numpy as np

from llorch_cpud.kernels.packed import LANES, PackedMatrix

F16_MAX = 65504.0
_PASS_ELEMENTS = 1 << 19  # weights per build pass: float64 temporaries of 4 MB (peak RSS stays near the model's)


class HeadScreen:
    def __init__(self, head: PackedMatrix, screen: PackedMatrix, norms: np.ndarray):
        self.head = head  # the float32 head whose product this reproduces
        self.screen = screen  # W': the same packing, every value rounded to float16
        self.norms = norms  # [6, n_out] float64: |W_j|_2, |W_j|_1, |W_j|_inf, then the same for D_j
        self.norm_max = norms.max(axis=1, keepdims=True)  # [6, 1]
        n = head.shape[1] + 8
        self.gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
        self.last_candidates = 0  # rows rescored in the last call (for tests and profiling)

    @classmethod
    def build(cls, head) -> "HeadScreen | None":
        """A screen for a float32 PackedMatrix head; None for any other head or values beyond float16."""
        if not isinstance(head, PackedMatrix) or head.w.dtype != np.float32:
            return None
        n_out, n_in = head.shape
        norms = np.empty((6, n_out), np.float64)
        step = max(16, _PASS_ELEMENTS // n_in)
        for r0 in range(0, n_out, step):
            ids = np.arange(r0, min(n_out, r0 + step))
            w = head.rows(ids).astype(np.float64)  # [r, n_in]
            if not np.isfinite(w).all() or np.abs(w).max(initial=0.0) > F16_MAX:
                return None
            d = np.abs(w - w.astype(np.float16))  # [r, n_in] the rounding, exactly
            a = np.abs(w)
            for k, m in enumerate((a, d)):
                norms[3 * k, ids] = np.sqrt(np.einsum("ij,ij->i", m, m))
                norms[3 * k + 1, ids] = m.sum(axis=1)
                norms[3 * k + 2, ids] = m.max(axis=1)
        norms *= 1 + 1e-12  # the float64 norms' own rounding, outward
        return cls(head, PackedMatrix(head.shape, head.w.astype(np.float16)), norms)  # padding rows stay zero

    @property
    def nbytes(self) -> int:
        return self.screen.nbytes + self.norms.nbytes

    def bounds(self, h: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """B [n_act, n_rows]: |screen value - full-product value| <= B, for activations h [n_act, n_in],
        on the head's rows `rows` (default: all)."""
        return self._bound(h, self.norms if rows is None else self.norms[:, rows])

    def bound_max(self, h: np.ndarray) -> np.ndarray:
        """[n_act, 1] >= every row's bound: B is increasing in each norm, so the norms' maxima bound it."""
        return self._bound(h, self.norm_max)

    def _bound(self, h: np.ndarray, n: np.ndarray) -> np.ndarray:
        h = np.abs(h.astype(np.float64))  # [n_act, n_in]
        a2 = np.sqrt((h * h).sum(axis=1))[:, None]  # [n_act, 1]
        a1, ainf = h.sum(axis=1)[:, None], h.max(axis=1)[:, None]
        s_w = np.minimum(np.minimum(a2 * n[0], ainf * n[1]), a1 * n[2])  # [n_act, n_rows] >= sum |h||W_j|
        s_d = np.minimum(np.minimum(a2 * n[3], ainf * n[4]), a1 * n[5])  # [n_act, n_rows] >= sum |h||D_j|
        return (s_d + self.gamma * (2 * s_w + s_d)) * (1 + 1e-9) + 1e-300

    def argmax(self, h: np.ndarray) -> np.ndarray:
        """argmax(h @ W.T, axis=1) for h [n_act, n_in], equal to np.argmax of the head's full product."""
        h = np.ascontiguousarray(h, dtype=np.float32)  # [n_act, n_in]
        n_out = self.head.shape[0]
        if not np.isfinite(h).all():
            return self._full(h)
        a32 = self.screen.matmul(h)  # [n_act, n_out] screen values
        if not np.isfinite(a32).all():
            return self._full(h)
        # With b_j = B_j + 1e-12 |a_j| (the float64 sums below round too) and M >= every b_j, a candidate
        # (a_j + b_j >= floor = max_m (a_m - b_m) >= max(a) - M) has a_j >= max(a) - 2M, and so has the
        # row attaining the floor: only those rows need their own bound.
        top = a32.max(axis=1, keepdims=True).astype(np.float64)  # [n_act, 1]
        wide = (self.bound_max(h) + 1e-12 * np.abs(a32).max(axis=1, keepdims=True)) * (1 + 1e-9)  # [n_act, 1]
        if not np.isfinite(wide).all():
            return self._full(h)
        thr = top - 2 * wide  # [n_act, 1] float64
        thr32 = thr.astype(np.float32)
        thr32 = np.where(thr32 > thr, np.nextafter(thr32, np.float32(-np.inf)), thr32)  # rounded down: no row lost
        near = np.nonzero((a32 >= thr32).any(axis=0))[0]  # rows within 2M of some activation's best
        a = a32[:, near].astype(np.float64)  # [n_act, n_near]
        b = self.bounds(h, near) + 1e-12 * np.abs(a)  # [n_act, n_near]
        floor = (a - b).max(axis=1, keepdims=True)  # [n_act, 1] the best guaranteed value
        rows = near[(a + b >= floor).any(axis=0)]  # candidate rows, for any of the activations
        self.last_candidates = len(rows)
        if len(np.unique(rows // LANES)) * LANES * 4 > n_out:
            return self._full(h)
        sub, ids = chunks_of(self.head, rows)
        vals = sub.matmul(h)  # [n_act, c·16] bit-identical to those rows of the full product
        vals[:, ids >= n_out] = -np.inf  # padding rows of the last chunk are not in the vocabulary
        if not np.isfinite(vals[:, ids < n_out]).all():
            return self._full(h)
        return ids[np.argmax(vals, axis=1)]  # the first largest, as np.argmax over every row

    def _full(self, h: np.ndarray) -> np.ndarray:
        self.last_candidates = self.head.shape[0]
        return np.argmax(self.head.matmul(h), axis=1)


def chunks_of(head: PackedMatrix, rows: np.ndarray) -> tuple[PackedMatrix, np.ndarray]:
    """The 16-row chunks holding `rows`, as a PackedMatrix (same data, same kernel), and the row id
    of each of its rows ([c·16], ascending)."""
    chunks = np.unique(rows // LANES)
    sub = PackedMatrix((len(chunks) * LANES, head.shape[1]), np.ascontiguousarray(head.w[chunks]))
    return sub, (chunks[:, None] * LANES + np.arange(LANES)).ravel()
