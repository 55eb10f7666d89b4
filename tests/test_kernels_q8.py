"""The `q8` numerics (activations quantized to 8 bits per 32-element block, integer dot products: what
llama.cpp computes) against independent arithmetic: gguf-py's own Q8_0 quantizer for the activation
blocks, and a numpy int64/float64 evaluation of ggml's block dot-product formulas for the products."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from llorch_cpud import kernels
from llorch_cpud.kernels import QuantMatrix
from llorch_cpud.kernels.quantized import _qkernels, set_numerics

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built")


def make(kind: str, n_out: int, n_in: int, seed: int = 0) -> tuple[np.ndarray, QuantMatrix]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_out, n_in)) * 0.05 + rng.standard_normal((n_out, 1)) * 0.02).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType[kind])  # [n_out, row bytes]
    return raw, QuantMatrix.from_blocks(kind, raw, (n_out, n_in))


def quantize_activations(x: np.ndarray, offset: bool = False):
    M, K = x.shape
    xq = np.empty((M, K), np.uint8)
    dx = np.empty((M, K // 32), np.float32)
    sx = np.empty((M, K // 32), np.float32)
    _qkernels.quantize_q8(np.ascontiguousarray(x, np.float32), xq, dx, sx, M, K, offset)
    return xq, dx, sx


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def test_activation_blocks_are_ggml_q8_0():
    """Our activation quantization gives the bytes of gguf-py's (ggml's reference) Q8_0 quantizer."""
    x = (np.random.default_rng(0).standard_normal((5, 256)) * np.array([0.01, 1, 30, 1e-3, 5])[:, None]).astype(np.float32)
    x[2, 32:64] = 0  # an all-zero block: scale 0, codes 0
    xq, dx, sx = quantize_activations(x)
    ref = quantize(x, GGMLQuantizationType.Q8_0).reshape(5, 8, 34)  # [rows, blocks, 2 + 32 bytes]
    assert np.array_equal(dx, ref[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert np.array_equal(xq.view(np.int8).reshape(5, 8, 32), ref[..., 2:].view(np.int8))
    q = xq.view(np.int8).reshape(5, 8, 32).astype(np.int64)
    d = np.abs(x.reshape(5, 8, 32)).max(-1) / np.float32(127)  # the unrounded scale ggml multiplies the sum by
    assert np.array_equal(sx, f16(d.astype(np.float32) * q.sum(-1).astype(np.float32)))  # Q8_1's s = d·Σq
    xu, dx2, _ = quantize_activations(x, offset=True)
    assert np.array_equal(xu.astype(np.int64) - 128, q.reshape(5, 256)) and np.array_equal(dx2, dx)


def ggml_reference(kind: str, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's vec_dot_q4_1_q8_1 / vec_dot_q8_0_q8_0, block by block, integers in int64, the rest float64."""
    n_out = raw.shape[0]
    M, K = x.shape
    nb = K // 32
    xq, dx, sx = quantize_activations(x)
    p = xq.view(np.int8).reshape(M, nb, 32).astype(np.int64)  # [M, NB, 32]
    if kind == "Q4_1":
        blocks = raw.reshape(n_out, nb, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # [N, NB]
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        qs = blocks[..., 4:20]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)  # [N, NB, 32]
        isum = np.einsum("nbj,mbj->mnb", q, p)  # [M, N, NB] exact
        return (d[None] * dx[:, None, :] * isum + m[None] * sx[:, None, :]).sum(-1)  # [M, N]
    blocks = raw.reshape(n_out, nb, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.int64)
    isum = np.einsum("nbj,mbj->mnb", q, p)
    return (d[None] * dx[:, None, :] * isum).sum(-1)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", [(192, 576), (576, 1536), (100, 64), (4100, 96)])
def test_q8_products_are_ggml_block_dot_products(kind, shape):
    raw, m = make(kind, *shape)
    set_numerics([m], "q8")
    rng = np.random.default_rng(1)
    for rows in (1, 3, 8, 9, 23):
        x = rng.standard_normal((rows, shape[1])).astype(np.float32)
        ref = ggml_reference(kind, raw, x)
        y = m.matmul(x)
        assert y.shape == (rows, shape[0]) and y.dtype == np.float32
        # float32 block sums in a fixed order vs float64: rounding only (the integer parts are exact)
        assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max() + 1e-6, (rows, np.abs(y - ref).max())
        # and not the float32-activation product: 8-bit activations are a different numerics
        m.numerics = "float32"
        f32 = m.matmul(x)
        m.numerics = "q8"
        diff = np.abs(f32 - y).max() / np.abs(f32).max()
        assert 1e-5 < diff < 3e-2, diff


@pytest.mark.parametrize("n_out", [320, 4160])  # chunks of 32 and of 64 rows (a lone row has its own tile)
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_q8_rows_do_not_depend_on_the_batch(kind, n_out):
    _, m = make(kind, n_out, 256)
    set_numerics([m], "q8")
    x = np.random.default_rng(2).standard_normal((21, 256)).astype(np.float32)
    together = m.matmul(x)
    for r in range(x.shape[0]):
        assert np.array_equal(together[r], m.matmul(x[r : r + 1])[0])


def test_q8_corrupted_weight_is_caught():
    """Negative control: one flipped bit per block (element 19) breaks the agreement asserted above."""
    raw, m = make("Q4_1", 192, 576)
    set_numerics([m], "q8")
    m.qs[:, :, 0, :, 3] ^= 0x10  # group 0, byte 3: high nibble = element 19
    x = np.random.default_rng(4).standard_normal((2, 576)).astype(np.float32)
    ref = ggml_reference("Q4_1", raw, x)
    assert np.abs(m.matmul(x) - ref).max() > 1e-3 * np.abs(ref).max()


def test_set_numerics_reaches_fused_matrices_and_rejects_unknown_modes():
    from llorch_cpud.kernels import linear_many

    mats = [make("Q4_1", 64, 128, seed=s)[1] for s in range(3)]
    views = QuantMatrix.fuse(mats)
    assert set_numerics({"a": views[0], "b": views[1], "c": views[2]}, "q8") == 4  # 3 views + the fused matrix
    x = np.random.default_rng(5).standard_normal((2, 128)).astype(np.float32)
    for part, alone in zip(linear_many(x, views), mats):
        set_numerics([alone], "q8")
        assert np.array_equal(part, alone.matmul(x))
    with pytest.raises(ValueError, match="numerics must be one of float32, q8"):
        set_numerics(mats, "int4")


def kquant(kind: str, n_out: int, n_in: int, seed: int = 0):
    """Random K-quant / Q5_1 blocks with weight-sized scales (test_kernels.random_blocks), as raw bytes and
    as the QuantMatrix they load into."""
    from test_kernels import random_blocks

    scales = (np.abs(np.random.default_rng(seed).standard_normal(16)) * 0.003).astype(np.float16)
    raw = random_blocks(kind, n_out, n_in, seed, scales)
    return raw, QuantMatrix.from_blocks(kind, raw, (n_out, n_in))


def kernel_kind_reference(kind: str, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The q8 block dot products of a rewritten K-quant / Q5_1 matrix, in int64 / float64: the kernel kind's
    exact float32 scales (split_blocks, which test_kernels.py holds to gguf-py's dequantizer) times the
    integer sums with the activations' Q8_1 (Q4_1F, Q8_DM: d·Σqp + m·s) or Q8_0 blocks (Q8_S16, a scale
    per 16: Σ_halves d_h·dx·Σqp)."""
    from llorch_cpud.kernels.quantized import _BLOCKS, split_blocks

    n_out = raw.shape[0]
    M, K = x.shape
    nb = K // 32
    per, size = _BLOCKS[kind]
    held, q, d, m = split_blocks(kind, raw.reshape(n_out, K // per, size))
    xq, dx, sx = quantize_activations(x)
    p = xq.view(np.int8).reshape(M, nb, 32).astype(np.int64)  # [M, NB, 32]
    if held == "Q4_1F":
        q = np.concatenate([q & 15, q >> 4], axis=-1)  # [N, NB, 32]: low nibbles are elements 0-15
    q = q.astype(np.int64).reshape(n_out, nb, 32)
    dx64, sx64 = dx.astype(np.float64), sx.astype(np.float64)
    if held == "Q8_S16":
        d = d.astype(np.float64).reshape(n_out, nb, 2)
        halves = [np.einsum("nbj,mbj->mnb", q[..., h * 16 : h * 16 + 16], p[..., h * 16 : h * 16 + 16]) for h in (0, 1)]
        return (dx64[:, None, :] * (d[None, ..., 0] * halves[0] + d[None, ..., 1] * halves[1])).sum(-1)
    isum = np.einsum("nbj,mbj->mnb", q, p)  # [M, N, NB] exact
    d, m = d.astype(np.float64).reshape(n_out, nb), m.astype(np.float64).reshape(n_out, nb)
    return (d[None] * dx64[:, None, :] * isum + m[None] * sx64[:, None, :]).sum(-1)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q5_1"])
def test_q8_products_of_rewritten_kquants_are_their_block_dot_products(kind):
    """`q8` reaches the K-quant kernel kinds (Q4_1F, Q8_DM, Q8_S16) too: each block's integer sum with
    8-bit activations, scaled in float32 - for any row count, row by row as in a batch; not the float32
    activation product; and a flipped weight bit is caught."""
    n_out, n_in = 96, 512
    raw, mat = kquant(kind, n_out, n_in)
    set_numerics([mat], "q8")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    ref = kernel_kind_reference(kind, raw, x)
    y = mat.matmul(x)
    bound = 2e-6 * np.abs(ref).max() + 1e-6  # float32 block sums in a fixed order vs float64
    assert np.abs(y - ref).max() <= bound, np.abs(y - ref).max()
    for r in (0, 4, 8):
        assert np.array_equal(mat.matmul(x[r : r + 1])[0], y[r])
    _, wide = kquant(kind, 4160, 256, seed=1)  # chunks of 64 rows
    set_numerics([wide], "q8")
    together = wide.matmul(x[:5, :256])
    for r in range(5):
        assert np.array_equal(wide.matmul(x[r : r + 1, :256])[0], together[r])
    mat.numerics = "float32"
    diff = np.abs(mat.matmul(x) - y).max() / np.abs(y).max()
    assert 1e-5 < diff < 5e-2, diff
    mat.numerics = "q8"
    mat.qs.reshape(-1)[7] ^= 0x11  # one byte of the first chunk: two nibbles or one 8-bit weight
    assert np.abs(mat.matmul(x) - ref).max() > 10 * bound
