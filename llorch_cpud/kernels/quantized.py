"""Matrix products on GGUF-quantized weights without a float32 copy of the matrix (Q4_1, Q8_0; and
Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, rewritten at load into kernel layouts with exactly the same weights: `split_blocks`).

Why: a decode step reads every weight once per token, so its speed is the speed of reading the
weights. Dequantized to float32, SmolLM2's Q4_1 weights are 4-5x more bytes than as stored.
`QuantMatrix` keeps the stored 4- or 8-bit integers and their per-block scales and computes
`x @ W.T` from them directly (C kernels in kernels/c/, built at install: SIMD, OpenMP over the
cores, GIL released).

Numerics: the same products as on the float32 dequantized matrix - activations stay float32,
each weight is `d·q + m` (Q4_1, formed in a register) or `d·q` (Q8_0, the scale applied per block)
exactly as ggml dequantizes it - only the order of the float32 additions differs, so results
agree with `x @ dequantize(W).T` to float32 rounding (tests/test_kernels.py checks that against
a float64 product, with a negative control). The result of a row never depends on
which thread computed it, nor on the other rows in the batch. With `numerics = "q8"` (a named mode,
see NUMERICS) the activations are first quantized to 8 bits per block as llama.cpp does and the block
dot products are exact integer sums (tests/test_kernels_q8.py: ggml's formulas evaluated in int64).
For Q5_0 weights (held as Q8_0) that is exactly llama.cpp's Q5_0 x Q8_0 dot product; for Q4_0 (held as
Q4_1) the -8·d offset meets the activation block's float16 sum (Q8_1's s) where llama.cpp subtracts 8
from each integer - the same up to float16 rounding of that sum. The K-quant kinds take 8-bit activations
in blocks of 32 too (Q4_1F and Q8_DM with Q8_1 blocks: d·dx·Σqp + m·s; Q8_S16 with Q8_0 blocks and its scale
per 16: Σ_halves d_h·dx·Σqp), where llama.cpp quantizes a K-quant's activations per 256 (Q8_K): the same
scheme at a finer activation scale, not its exact numbers. F16/BF16/F32 and the other types are
PackedMatrix and always compute with float32 activations, in either mode.

Layout. ggml stores a row as consecutive 32-element blocks; a kernel that walks one row at a time
needs a horizontal reduction per block. So at load the blocks are repacked *row-interleaved*:
rows are grouped in chunks of L (32 or 64), and for each chunk, block b and byte j, the L rows'
bytes are contiguous. The kernel's inner loop then runs over L rows with
no reduction (one vector lane per output row); per-block scales are applied once per block.

    Q4_1:  qs [n_chunk, n_block, 4, L, 4] uint8: group g, row, byte jj = the block's byte j = 4g+jj
           (low nibble = element j, high = element j+16)
           d, m [n_chunk, n_block, L] float16 (as stored: 20 bytes per 32 weights, like ggml's)
    Q8_0:  qs [n_chunk, n_block, 8, L, 4] int8 (element 4g+jj);  d [n_chunk, n_block, L] float16

16 rows x 4 bytes of a group are one 64-byte vector: 4 consecutive elements per output row, the
operand shape of an integer dot-product instruction (AVX-512 VNNI's vpdpbusd), and for float32
activations each byte position of the vector is shifted out in turn.

Many rows at once (a prefill) use the same kernel: it tiles 8 activation rows per converted weight
vector, which reaches ~350 GFLOP/s on this machine's 2 cores - more than numpy's float32 sgemm, and
with no float32 copy of the matrix. While these kernels run (OpenMP threads on every core), numpy's
BLAS is kept to one thread (`blas_single_thread`): two thread pools spinning on two cores starve
each other (a 128-token prefill took 10x longer). The generic operations (`linear`, ...) are in ops.py.
"""

from __future__ import annotations

import numpy as np

from llorch_cpud.kernels import isa

# The one place the C extension is imported: the best variant built for this CPU (kernels/isa.py), or None
# (no C compiler at install: models load dense). Everything else takes `_qkernels` from here.
_qkernels = isa.load()

#: The kernels' block formats: ggml's Q4_1 and Q8_0 (float16 scales per 32 weights), and for the
#: K-quants the same 4-bit / 8-bit layouts with float32 scales - Q4_1F (d, m per 32), Q8_S16 (d per 16)
#: and Q8_DM (d, m per 32).
KERNEL_KINDS = ("Q4_1", "Q8_0", "Q4_1F", "Q8_S16", "Q8_DM")

#: ggml types held quantized, each rewritten at load (`split_blocks`) into a kernel kind with the very
#: same weight values. Other types are packed as float (kernels/packed.py).
QUANT_TYPES = ("Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

#: (elements, bytes) of one ggml block.
_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q4_K": (256, 144),
           "Q5_K": (256, 176), "Q6_K": (256, 210)}


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-blocks [N, NS, bytes] -> per 32-weight sub-block d·sc and -dmin·mn, [N, NS·8]
    float32 (6-bit scales and mins packed in 12 bytes, as ggml's get_scale_min_k4 unpacks them)."""
    N = blocks.shape[0]
    d, dmin = _f16(blocks[..., 0:2]).astype(np.float32), _f16(blocks[..., 2:4]).astype(np.float32)  # [N, NS]
    s0, s1, s2 = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    sc = np.concatenate([s0 & 63, (s2 & 15) | ((s0 >> 6) << 4)], axis=-1).astype(np.float32)  # [N, NS, 8]
    mn = np.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], axis=-1).astype(np.float32)  # [N, NS, 8]
    return (d[..., None] * sc).reshape(N, -1), -(dmin[..., None] * mn).reshape(N, -1)


def split_blocks(kind: str, blocks: np.ndarray):
    """ggml blocks [N, n_blocks, block bytes] of `kind` -> (kernel kind, q, d, m) per 32-weight block:
    q [N, NB, 16] uint8 nibbles (byte j: element j low, j+16 high) or [N, NB, 32] int8; d [N, NB] (or
    [N, NB, 2]: per 16 weights) and m [N, NB] or None. Weight = d·q + m (Q4 kinds) or d·q (Q8 kinds),
    which equals ggml's (and gguf-py's) dequantized weight bit for bit (tests/test_kernels.py):

    Q4_1, Q8_0  as stored (float16 d, m).
    Q4_0        w = d·(q-8) -> Q4_1 with m = -8·d: d·q, -8·d and their sum are float16 scale times
                small integers, exact in float32 (ValueError if -8·d overflows float16).
    Q5_0        w = d·(q-16), q of 5 bits -> Q8_0 with int8 q-16.
    Q5_1        w = d·q + m, q of 5 bits -> Q8_DM with int8 q and d, m widened to float32.
    Q4_K        super-blocks of 256: w = (d·sc)·q - dmin·mn per 32 (6-bit sc, mn) -> Q4_1F with float32
                d·sc and -dmin·mn, each an exact float32 product, as gguf-py forms them.
    Q5_K        the same with 5-bit q -> Q8_DM: int8 q, float32 d·sc and -dmin·mn per 32.
    Q6_K        w = (d·sc)·(q-32), q of 6 bits, int8 sc per 16 -> Q8_S16 with int8 q-32, float32 d·sc."""
    N = blocks.shape[0]
    f32 = np.float32
    if kind == "Q4_1":
        return "Q4_1", blocks[..., 4:20], _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    if kind == "Q8_0":
        return "Q8_0", blocks[..., 2:34].view(np.int8), _f16(blocks[..., 0:2]), None
    if kind == "Q4_0":
        d = _f16(blocks[..., 0:2])
        with np.errstate(over="ignore"):
            m = (d.astype(f32) * f32(-8.0)).astype(np.float16)  # exact: a power-of-two multiple
        if not np.isfinite(m).all():
            raise ValueError("Q4_0 block scale too large to rewrite as Q4_1 (float16 overflow)")
        return "Q4_1", blocks[..., 2:18], d, m
    if kind in ("Q5_0", "Q5_1"):
        o = 2 if kind == "Q5_0" else 4  # Q5_1 has m after d
        qh = np.ascontiguousarray(blocks[..., o : o + 4]).view("<u4")  # [N, NB, 1]: bit j = high bit of element j
        nib = blocks[..., o + 4 : o + 20]  # [N, NB, 16]
        low = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.int16)  # [N, NB, 32]: elements 0-15, 16-31
        q = low | (((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4)  # [N, NB, 32] 5-bit
        if kind == "Q5_0":
            return "Q8_0", (q - 16).astype(np.int8), _f16(blocks[..., 0:2]), None
        return "Q8_DM", q.astype(np.int8), _f16(blocks[..., 0:2]).astype(f32), _f16(blocks[..., 2:4]).astype(f32)
    if kind in ("Q4_K", "Q5_K"):
        d, m = _k_scales(blocks)  # [N, NB] float32: d·sc, -dmin·mn
        qs = blocks[..., -128:].reshape(N, -1, 4, 1, 32)  # [N, NS, 4, 1, 32]: sub-blocks 2i (low), 2i+1 (high)
        vals = ((qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(N, -1, 32)  # [N, NB, 32]
        if kind == "Q4_K":
            return "Q4_1F", vals[..., :16] | (vals[..., 16:] << 4), d, m  # nibbles in Q4_1's order
        qh = blocks[..., 16:48].reshape(N, -1, 1, 32)  # [N, NS, 1, 32]: bit s = 5th bit in sub-block s
        high = ((qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1).reshape(N, -1, 32)  # [N, NB, 32]
        return "Q8_DM", (vals | (high << 4)).astype(np.int8), d, m
    if kind == "Q6_K":
        ql = blocks[..., 0:128].reshape(N, -1, 2, 64)  # [N, NS, 2 halves, 64]
        qh = blocks[..., 128:192].reshape(N, -1, 2, 32)  # [N, NS, 2, 32]: 2 high bits of 4 elements each
        sc = blocks[..., 192:208].view(np.int8).astype(f32)  # [N, NS, 16]
        d = _f16(blocks[..., 208:210]).astype(f32)  # [N, NS]
        parts = [(ql[..., :32] & 15) | (((qh >> 0) & 3) << 4), (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4),
                 (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)]
        q = (np.concatenate(parts, axis=-1).astype(np.int16) - 32).astype(np.int8)  # [N, NS, 2, 128]
        return "Q8_S16", q.reshape(N, -1, 32), (d[..., None] * sc).reshape(N, -1, 2), None
    raise ValueError(f"QuantMatrix holds {', '.join(QUANT_TYPES)}, not {kind}")


#: How products on quantized weights treat their float32 activations:
#:   float32  as they are: the product of the float32 dequantized matrix (to float32 rounding)
#:   q8       quantized to 8 bits per 32-element block first, as llama.cpp does (Q8_1 blocks for Q4_1
#:            weights, Q8_0 for Q8_0; the K-quant kinds likewise), then exact integer dot products:
#:            llama.cpp's numerics and speed (held quantized matrices only; packed float matrices keep
#:            float32 activations)
NUMERICS = ("float32", "q8")


def available() -> bool:
    """Whether the compiled kernels are importable (the C extension built at install)."""
    return _qkernels is not None


def chunk_rows(n_out: int) -> int:
    """Rows per interleaved chunk: 32 for small matrices (more chunks to share between cores), else 64."""
    return 32 if n_out < 4096 else 64


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float16 (little-endian half floats, kept as stored: the kernels widen them)."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0]


class QuantMatrix:
    """A weight matrix `[n_out, n_in]` (nn.Linear orientation) kept as ggml Q4_1 or Q8_0 blocks.

    `matmul(x)` is `x @ W.T` ([rows, n_in] -> [rows, n_out]); `dequantize()` the float32 matrix
    (what `GGUFFile.tensor` returns); `rows(ids)` dequantizes selected rows (an embedding lookup)."""

    def __init__(self, kind: str, shape: tuple[int, int], qs: np.ndarray, d: np.ndarray, m: np.ndarray | None,
                 parent: "tuple[QuantMatrix, int] | None" = None):
        self.kind, self.shape = kind, (int(shape[0]), int(shape[1]))
        self.qs, self.d, self.m = qs, d, m
        self.dtype = np.dtype(np.float32)  # the dtype it computes in
        self.ndim = 2
        self.parent = parent  # (fused matrix, first row in it) when this matrix is a view of a fused one
        self.numerics = "float32"  # or "q8": activations quantized to 8 bits per block (NUMERICS)
        self.source = kind  # the ggml type the file stored (Q4_0 / Q5_0 are held as Q4_1 / Q8_0)

    @classmethod
    def fuse(cls, mats: "list[QuantMatrix]") -> "list[QuantMatrix] | None":
        """Matrices sharing their input (Q, K, V; gate, up) stacked into one, returned as views of it,
        so `linear_many` computes them in one kernel call; same memory, bit-identical results (a row's
        sum never depends on the other rows). None when they cannot be fused (different types, or a
        row count that is not a whole number of chunks)."""
        first = mats[0]
        L = first.d.shape[2]
        if any(m.kind != first.kind or m.shape[1] != first.shape[1] or m.d.shape[2] != L or m.shape[0] % L
               or m.parent is not None for m in mats):
            return None
        qs = np.concatenate([m.qs for m in mats])  # chunk axis first: each part stays contiguous
        d = np.concatenate([m.d for m in mats])
        mm = np.concatenate([m.m for m in mats]) if first.m is not None else None
        fused = cls(first.kind, (sum(m.shape[0] for m in mats), first.shape[1]), qs, d, mm)
        views, c0 = [], 0
        for m in mats:
            c1 = c0 + m.d.shape[0]
            views.append(cls(m.kind, m.shape, qs[c0:c1], d[c0:c1], mm[c0:c1] if mm is not None else None,
                             parent=(fused, c0 * L)))
            c0 = c1
        return views

    # -------------------------------------------------------------- construction

    @classmethod
    def from_blocks(cls, kind: str, raw: np.ndarray, shape: tuple[int, int], row_order: np.ndarray | None = None,
                    chunk: int | None = None) -> "QuantMatrix":
        """From a tensor's stored bytes ([n_out, row_bytes] uint8, as GGUFFile.raw gives them), rows
        optionally reordered (`row_order`) before packing."""
        n_out, n_in = shape
        if kind not in QUANT_TYPES:
            raise ValueError(f"QuantMatrix holds {', '.join(QUANT_TYPES)}, not {kind}")
        per_block, bsize = _BLOCKS[kind]
        if n_in % per_block:
            raise ValueError(f"row length {n_in} is not a multiple of {per_block} ({kind} blocks)")
        nb = n_in // 32
        chunk = chunk or chunk_rows(n_out)
        blocks = np.asarray(raw).reshape(n_out, n_in // per_block, bsize)  # [N, blocks, block bytes]
        if row_order is not None:
            blocks = blocks[row_order]
        source, (kind, q, d, m) = kind, split_blocks(kind, blocks)  # q [N, NB, 16|32]; d, m [N, NB(, 2)]
        n_chunk = -(-n_out // chunk)
        pad = n_chunk * chunk - n_out
        if pad:  # zero rows (scale 0) complete the last chunk; their outputs are dropped
            q, d = (np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in (q, d))
            m = None if m is None else np.concatenate([m, np.zeros((pad,) + m.shape[1:], m.dtype)])

        def by_chunk(a):  # [N, NB(, S)] -> [C, NB·S, L]: the L rows of a chunk side by side
            a = a.reshape(n_chunk, chunk, nb, -1).transpose(0, 2, 3, 1)  # [C, NB, S, L]
            return np.ascontiguousarray(a).reshape(n_chunk, -1, chunk)

        d = by_chunk(d)
        m = None if m is None else by_chunk(m)
        G = q.shape[-1] // 4  # 4 (4-bit kinds: 16 bytes a block) or 8 (8-bit: 32)
        q = q.reshape(n_chunk, chunk, nb, G, 4)  # [C, L, NB, G, 4]
        qs = np.ascontiguousarray(q.transpose(0, 2, 3, 1, 4))  # [C, NB, G, L, 4]
        out = cls(kind, (n_out, n_in), qs, d, m)
        out.source = source
        return out

    # -------------------------------------------------------------- products

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + (self.m.nbytes if self.m is not None else 0)

    @property
    def _padded(self) -> int:
        return self.d.shape[0] * self.d.shape[2]

    def kernel_args(self) -> tuple:
        """(kind, q8, qs, d, m, K, n_chunk, L): this matrix as the C kernels take it (kernels/c/matmul.c's Mat)."""
        n_chunk, L = self.d.shape[0], self.d.shape[2]
        return (KERNEL_KINDS.index(self.kind), self.numerics == "q8", self.qs, self.d, self.m, self.shape[1], n_chunk, L)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T: [rows, n_in] -> [rows, n_out] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self._padded), np.float32)  # [rows, N padded to the chunk]
        _qkernels.matmul(x, out, x.shape[0], *self.kernel_args())
        return out[:, : self.shape[0]] if self._padded != self.shape[0] else out

    def _dequant_t(self, c0: int, c1: int) -> np.ndarray:
        """Chunks c0..c1 dequantized, transposed: [n_in, (c1-c0)·L] float32."""
        n_chunk, L = self.d.shape[0], self.d.shape[2]
        out_t = np.empty((self.shape[1], (c1 - c0) * L), np.float32)
        if self.kind == "Q4_1":
            _qkernels.q4_1_dequant_t(self.qs, self.d, self.m, out_t, self.shape[1], n_chunk, L, c0, c1)
        else:
            _qkernels.q8_0_dequant_t(self.qs, self.d, out_t, self.shape[1], n_chunk, L, c0, c1)
        return out_t

    def dequantize(self) -> np.ndarray:
        """The float32 matrix [n_out, n_in] (C-contiguous)."""
        if self.kind not in ("Q4_1", "Q8_0"):  # float32-scale kinds: numpy, chunk by chunk
            return np.concatenate([self.rows(np.arange(r, min(r + 4096, self.shape[0])))
                                   for r in range(0, self.shape[0], 4096)])
        return np.ascontiguousarray(self._dequant_t(0, self.d.shape[0])[:, : self.shape[0]].T)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` dequantized: [len(ids)] -> [len(ids), n_in] (the embedding lookup)."""
        ids = np.asarray(ids, dtype=np.int64)
        L = self.d.shape[2]
        c, lane = ids // L, ids % L  # [rows]
        d = self.d[c, :, lane].astype(np.float32)  # [rows, NB] ([rows, 2·NB] for Q8_S16)
        q = self.qs[c, :, :, lane, :]  # [rows, NB, G, 4]
        q = q.reshape(len(ids), q.shape[1], -1)  # [rows, NB, 4·G]: byte j of each block
        if self.kind in ("Q4_1", "Q4_1F"):
            vals = np.concatenate([q & 15, q >> 4], axis=-1).astype(np.float32)  # [rows, NB, 32]
            w = d[..., None] * vals + self.m[c, :, lane][..., None].astype(np.float32)  # [rows, NB, 32]
        elif self.kind == "Q8_S16":
            w = d.reshape(len(ids), -1, 2, 1) * q.reshape(len(ids), -1, 2, 16).astype(np.float32)  # [rows, NB, 2, 16]
        elif self.kind == "Q8_DM":
            w = d[..., None] * q.astype(np.float32) + self.m[c, :, lane][..., None]  # [rows, NB, 32]
        else:
            w = d[..., None] * q.astype(np.float32)  # [rows, NB, 32]
        return w.reshape(len(ids), self.shape[1])  # [rows, n_in]

    def __repr__(self) -> str:
        held = self.kind if self.source == self.kind else f"{self.source} held as {self.kind}"
        return f"QuantMatrix({held}, shape={self.shape}, {self.nbytes / 1e6:.1f} MB)"


def set_numerics(weights, numerics: str) -> int:
    """Every QuantMatrix among `weights` (a dict's values or any iterable), and the fused matrices they
    are views of, computes in `numerics` (one of NUMERICS). Returns how many matrices were set."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, not {numerics!r}")
    seen = {}
    for w in (weights.values() if isinstance(weights, dict) else weights):
        if isinstance(w, QuantMatrix):
            seen[id(w)] = w
            if w.parent is not None:
                seen[id(w.parent[0])] = w.parent[0]
    for w in seen.values():
        w.numerics = numerics
    return len(seen)

