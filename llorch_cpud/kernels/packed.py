"""Float weight matrices packed for the C kernel: GPT-2's projections and head, and every GGUF
matrix of a type without a quantized kernel (F16 kept as float16, the rest dequantized to float32).

Why: numpy's BLAS is at the memory-bandwidth limit for one row (a matrix-vector product), but for
the 2-16 rows of a batched decode step its matrix products stream the weights at only 15-21 GB/s
here, and a batched step then costs almost as much per row as separate steps. The same
lane-per-output-row kernel as QuantMatrix, on float32, reads the weights once per step whatever the
row count (~30 GB/s with 8 rows, ~45 GB/s with one, ~360 GFLOP/s for a prefill).

Layout: W `[n_out, n_in]` (nn.Linear orientation; a GPT-2 Conv1D weight is stored transposed) as
`[n_chunk, n_in, 16]`: for each chunk of 16 output rows, element k of the 16 rows side by side. The
kernel streams one chunk contiguously, one SIMD lane per output row, summing in a fixed order
(32-term partial sums, then added), so a row's result never depends on the other rows of the batch.

Storage is float32, or 16 bits for a matrix whose values are float16 (a GGUF F16 tensor) or bfloat16
(BF16; held as the uint16 top halves of the float32 values, numpy having no bfloat16): half the bytes
a decode step reads, and the same products, since every 16-bit value widens exactly to float32 before
the same float32 arithmetic.
"""

from __future__ import annotations

import numpy as np

from llorch_cpud.kernels.quantized import _qkernels

LANES = 16


class PackedMatrix:
    """A float32 matrix `[n_out, n_in]` packed for the kernel; `matmul(x)` is `x @ W.T`."""

    def __init__(self, shape: tuple[int, int], w: np.ndarray, parent: "tuple[PackedMatrix, int] | None" = None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.w = w  # [n_chunk, n_in, 16] float32, float16, or uint16 = bfloat16 bits (the storage)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2
        self.parent = parent  # (fused matrix, first row in it) when a view of a fused one

    @classmethod
    def from_dense(cls, w: np.ndarray, storage=np.float32) -> "PackedMatrix":
        """From W [n_out, n_in] (any memory order); rows padded with zeros to a multiple of 16.

        storage float16 needs a float16 W; storage "bfloat16" a float32 W whose values are all bfloat16
        (low 16 bits zero) - ValueError otherwise: the values are kept exactly or not at all."""
        if isinstance(storage, str) and storage == "bfloat16":
            if w.dtype != np.float32:
                raise ValueError("bfloat16 storage needs the float32 values of a bfloat16 matrix")
            bits = np.ascontiguousarray(w).view(np.uint32)
            if (bits & 0xFFFF).any():
                raise ValueError("bfloat16 storage: the matrix has values that are not bfloat16 (low bits set)")
            w, storage = (bits >> 16).astype(np.uint16), np.dtype(np.uint16)
        storage = np.dtype(storage)
        if storage not in (np.float32, np.float16, np.uint16):
            raise ValueError(f"PackedMatrix stores float32, float16 or bfloat16, not {storage}")
        if storage == np.float16 and w.dtype != np.float16:
            raise ValueError("float16 storage needs a float16 matrix (its values must be kept exactly)")
        n_out, n_in = w.shape
        n_chunk = -(-n_out // LANES)
        packed = np.zeros((n_chunk, n_in, LANES), storage)  # [C, n_in, 16]
        full = n_out // LANES
        step = max(1, (8 << 20) // (LANES * n_in * 4))  # chunks per copy: an ~8 MB temporary, not a whole matrix
        for c0 in range(0, full, step):
            c1 = min(full, c0 + step)
            rows = w[c0 * LANES : c1 * LANES].reshape(c1 - c0, LANES, n_in)  # [c, 16, K] (a copy if w is transposed)
            packed[c0:c1] = rows.transpose(0, 2, 1)  # [c, 16, K] -> [c, K, 16]
        rest = n_out - full * LANES
        if rest:
            packed[full, :, :rest] = w[full * LANES :].T  # [rest, K] -> [K, rest]
        return cls((n_out, n_in), packed)

    @classmethod
    def fuse(cls, mats: "list[PackedMatrix]") -> "list[PackedMatrix] | None":
        """Matrices sharing their input stacked into one (see QuantMatrix.fuse); None if a row count is
        not a whole number of chunks or the inputs differ."""
        if any(m.shape[1] != mats[0].shape[1] or m.shape[0] % LANES or m.parent is not None
               or m.w.dtype != mats[0].w.dtype for m in mats):
            return None
        w = np.concatenate([m.w for m in mats])
        fused = cls((sum(m.shape[0] for m in mats), mats[0].shape[1]), w)
        views, c0 = [], 0
        for m in mats:
            c1 = c0 + m.w.shape[0]
            views.append(cls(m.shape, w[c0:c1], parent=(fused, c0 * LANES)))
            c0 = c1
        return views

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def kernel_args(self) -> tuple:
        """(kind, q8, w, d, m, K, n_chunk, 16): this matrix as the C kernels take it (kernels/c/matmul.c's Mat;
        kinds 5-7 after quantized.KERNEL_KINDS: float32, float16, bfloat16 storage)."""
        kind = 5 if self.w.dtype == np.float32 else 6 if self.w.dtype == np.float16 else 7
        return (kind, False, self.w, None, None, self.shape[1], self.w.shape[0], LANES)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T: [rows, n_in] -> [rows, n_out] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_chunk = self.w.shape[0]
        out = np.empty((x.shape[0], n_chunk * LANES), np.float32)  # [rows, n_out padded to 16]
        _qkernels.matmul(x, out, x.shape[0], *self.kernel_args())
        return out[:, : self.shape[0]] if n_chunk * LANES != self.shape[0] else out

    def dequantize(self) -> np.ndarray:
        """W as a C-contiguous float32 [n_out, n_in] array (exactly the values packed)."""
        w = self.w.transpose(0, 2, 1).reshape(-1, self.shape[1])[: self.shape[0]]  # [n_out, n_in]
        return _widen(np.ascontiguousarray(w))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of W: [len(ids)] -> [len(ids), n_in] (an embedding lookup)."""
        ids = np.asarray(ids, dtype=np.int64)
        return _widen(self.w[ids // LANES, :, ids % LANES])  # [rows, n_in]

    def __repr__(self) -> str:
        return f"PackedMatrix(shape={self.shape}, {self.w.dtype}, {self.nbytes / 1e6:.1f} MB)"


def _widen(w: np.ndarray) -> np.ndarray:
    """Stored values as float32: float32 as is, float16 widened, uint16 bfloat16 bits shifted up (exact)."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w.astype(np.float32, copy=False)
