"""The C kernels (kernels/: quantized.py, packed.py, ops.py + c/) against independent arithmetic.

The reference for a quantized matrix is gguf-py's own dequantizer (llama.cpp's Python package, which
tests/test_gguf_format.py checks against Candle) followed by a float64 matrix product; the kernels
must agree to float32 rounding for any number of rows, and a corrupted kernel input must not."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llorch_cpud import kernels
from llorch_cpud.kernels import PackedMatrix, QuantMatrix, as_dense, linear, linear_many, take_rows

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built")
# Tests of what a model loads as or runs on the C path: with LLORCH_KERNELS=numpy models load dense.
needs_c_path = pytest.mark.skipif(not kernels.enabled(), reason="models load on the numpy path (LLORCH_KERNELS=numpy)")


def make_blocks(kind: str, n_out: int, n_in: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw ggml bytes [n_out, row_bytes], float32 dequantized [n_out, n_in]) of a random matrix."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_out, n_in)) * 0.05 + rng.standard_normal((n_out, 1)) * 0.02).astype(np.float32)
    qtype = GGMLQuantizationType[kind]
    if kind.endswith("_K"):  # gguf-py cannot quantize K-quants: random fields, weight-sized scales
        scales = (np.abs(rng.standard_normal(16)) * 0.003).astype(np.float16)
        raw = random_blocks(kind, n_out, n_in, seed, scales)
        return raw, dequantize(raw, qtype).reshape(n_out, n_in).astype(np.float32)
    raw = quantize(w, qtype)  # gguf-py: [n_out, row_bytes] uint8
    return raw, dequantize(raw, qtype).reshape(n_out, n_in).astype(np.float32)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("shape", [(192, 576), (1536, 576), (576, 1536), (100, 64), (4100, 96)])
def test_matmul_matches_dequantized_product(kind, shape):
    """Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are rewritten at load (as Q4_1, Q8_0, Q8_DM, Q4_1F, Q8_DM,
    Q8_S16): their dequantized values must still be gguf-py's, bit for bit, and the products the float64 product of those."""
    if kind.endswith("_K"):
        shape = (shape[0], -(-shape[1] // 256) * 256)  # K-quant rows are whole 256-weight super-blocks
    raw, w = make_blocks(kind, *shape)
    m = QuantMatrix.from_blocks(kind, raw, shape)
    assert np.array_equal(m.dequantize(), w)  # the stored values are exactly ggml's
    rng = np.random.default_rng(1)
    for rows in (1, 2, 3, 7, 8, 9, 16, 23, 40):  # tiles of 8 rows and every remainder path
        x = rng.standard_normal((rows, shape[1])).astype(np.float32)
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        y = m.matmul(x)
        assert y.shape == (rows, shape[0]) and y.dtype == np.float32
        fp32 = x @ w.T  # what BLAS makes of the same float32 product: the scale of rounding to accept
        assert np.abs(y - ref).max() <= 4 * np.abs(fp32 - ref).max() + 1e-6, (rows, np.abs(y - ref).max())


@pytest.mark.parametrize("n_out", [320, 4160])  # chunks of 32 and of 64 rows (a lone row has its own tile)
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q5_1"])
def test_row_results_do_not_depend_on_the_batch(kind, n_out):
    """A row's result is bit-identical alone or with other rows (so batching streams changes nothing)."""
    raw, _ = make_blocks(kind, n_out, 256)
    m = QuantMatrix.from_blocks(kind, raw, (n_out, 256))
    x = np.random.default_rng(2).standard_normal((21, 256)).astype(np.float32)
    together = m.matmul(x)
    for r in range(x.shape[0]):
        assert np.array_equal(together[r], m.matmul(x[r : r + 1])[0])
    assert np.array_equal(together, m.matmul(x))  # and deterministic run to run


def test_row_order_and_rows_lookup():
    raw, w = make_blocks("Q4_1", 130, 64)
    order = np.random.default_rng(3).permutation(130)
    m = QuantMatrix.from_blocks("Q4_1", raw, (130, 64), row_order=order)
    assert np.array_equal(m.dequantize(), w[order])
    ids = np.array([0, 31, 32, 63, 64, 129, 5])
    assert np.array_equal(m.rows(ids), w[order][ids])
    assert np.array_equal(take_rows(m, ids), w[order][ids]) and np.array_equal(take_rows(w, ids), w[ids])
    assert np.array_equal(as_dense(m), w[order]) and as_dense(w) is w
    x = np.ones((1, 64), np.float32)
    assert np.allclose(linear(x, m), x @ w[order].T, rtol=1e-5, atol=1e-5)


def test_corrupted_kernel_input_is_caught():
    """Negative control: the comparison above fails for a kernel fed one wrong nibble per block."""
    raw, w = make_blocks("Q4_1", 192, 576)
    m = QuantMatrix.from_blocks("Q4_1", raw, (192, 576))
    m.qs[:, :, 3, :] ^= 0x10  # flip one bit of element 19 in every block
    x = np.random.default_rng(4).standard_normal((1, 576)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    fp32 = x @ w.T
    assert np.abs(m.matmul(x) - ref).max() > 100 * np.abs(fp32 - ref).max()


def test_bad_buffers_raise_instead_of_reading_out_of_bounds():
    from llorch_cpud.kernels import _qkernels

    raw, _ = make_blocks("Q8_0", 64, 64)
    m = QuantMatrix.from_blocks("Q8_0", raw, (64, 64))
    x = np.ones((2, 64), np.float32)
    out = np.empty((2, 64), np.float32)
    with pytest.raises(ValueError, match="x: buffer"):
        _qkernels.matmul(x, out, 3, *m.kernel_args())  # claims 3 rows, x holds 2
    with pytest.raises(ValueError, match="out: buffer"):
        _qkernels.matmul(x, out[:1], 2, *m.kernel_args())
    with pytest.raises(ValueError, match="multiple of 32"):
        _qkernels.matmul(x, out, 2, 2, False, m.qs, m.d, None, 60, 2, 32)
    with pytest.raises(ValueError):
        QuantMatrix.from_blocks("Q4_1", np.zeros((4, 10), np.uint8), (4, 16))
    with pytest.raises(ValueError, match="holds"):
        QuantMatrix.from_blocks("Q3_K", np.zeros((4, 110), np.uint8), (4, 256))


@needs_c_path
def test_model_keeps_q4_1_quantized_and_float32_mode_agrees(tmp_path):
    """The default SmolLM2 loads its matrices as QuantMatrix (4-5x fewer bytes than float32), and
    the plain numpy model (quantized=False, as LLORCH_KERNELS=numpy) computes the same logits to float32 rounding."""
    from llorch_cpud.formats import default_model_path
    from llorch_cpud.formats.gguf import GGUFFile
    from llorch_cpud.models.base import Segment
    from llorch_cpud.formats.gguf_load import load_llama

    path = default_model_path()
    if not path.exists():
        pytest.skip("SmolLM2 GGUF not installed")
    qm = load_llama(GGUFFile.open(path))
    dm = load_llama(GGUFFile.open(path), quantized=False)
    assert isinstance(qm.weights.blocks[0].ffn_up_weight, QuantMatrix)
    assert isinstance(qm.weights.token_embd_weight, QuantMatrix)  # Q8_0
    assert isinstance(dm.weights.blocks[0].ffn_up_weight, np.ndarray)
    q_bytes = sum(w.nbytes for w in qm.tensors().values())
    d_bytes = sum(w.nbytes for w in dm.tensors().values())
    assert q_bytes * 4 < d_bytes
    tokens = np.array([1, 504, 3458, 282, 4649, 314], dtype=np.int64)
    for model in (qm, dm):
        cache = model.new_cache(8)
        h = model.forward(tokens, [Segment(cache, 0, len(tokens))])
        model._test_logits = model.logits(h[-1:])  # [1, vocab], the quantized kernel (one row)
        step = model.forward(np.array([28], dtype=np.int64), [Segment(cache, len(tokens), 1)])
        model._test_step = model.logits(step)
    for attr in ("_test_logits", "_test_step"):
        a, b = getattr(qm, attr), getattr(dm, attr)
        assert np.abs(a - b).max() <= 1e-3, attr  # checkpoint 8's tolerance
        assert a.argmax() == b.argmax()


@pytest.mark.parametrize("n_head,n_kv,head_dim", [(9, 3, 64), (4, 4, 16), (6, 2, 24), (16, 2, 128), (14, 2, 32),
                                                   (4, 1, 96), (5, 5, 80), (8, 1, 16), (12, 12, 64)])
def test_decode_attention_matches_the_numpy_stage_functions(n_head, n_kv, head_dim):
    """The batched one-row attention kernel computes what attention_scores + attention_heads compute
    (GQA grouping, causal length, softmax), for sequences of different lengths in one call."""
    from llorch_cpud.kernels import decode_attention
    from llorch_cpud.models.llama import attention_heads, attention_scores

    rng = np.random.default_rng(5)
    lengths = [1, 2, 17, 64, 100]
    caches = [rng.standard_normal((2, n_kv, 100, head_dim)).astype(np.float32) * 2 for _ in lengths]
    q = rng.standard_normal((len(lengths), n_head, head_dim)).astype(np.float32) * 2
    k_new = rng.standard_normal((len(lengths), n_kv, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((len(lengths), n_kv, head_dim)).astype(np.float32)
    got = decode_attention(q, k_new, v_new, [c[0] for c in caches], [c[1] for c in caches], lengths)  # [B, H·hd]
    for b, T in enumerate(lengths):
        assert np.array_equal(caches[b][0][:, T - 1], k_new[b]) and np.array_equal(caches[b][1][:, T - 1], v_new[b])
        k, v = caches[b][0][:, :T], caches[b][1][:, :T]
        ref = attention_heads(attention_scores(q[b : b + 1], k, T - 1), v)[0]  # [H·hd]
        assert np.abs(got[b] - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max()), (b, np.abs(got[b] - ref).max())
    into = np.full((len(lengths), n_head * head_dim), np.nan, np.float32)  # out=: written in place, same values
    again = [c.copy() for c in caches]
    assert decode_attention(q, k_new, v_new, [c[0] for c in again], [c[1] for c in again], lengths, out=into) is into
    assert np.array_equal(into, got)
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(q, k_new, v_new, [c[0] for c in again], [c[1] for c in again], lengths, out=into[:, :-1])
    # negative control: a sequence attending to too few positions is far off
    scratch = [c.copy() for c in caches[-1]]
    short = decode_attention(q[-1:], scratch[0][:, 59][None], scratch[1][:, 59][None], [scratch[0]], [scratch[1]], [60])
    assert np.abs(short[0] - got[-1]).max() > 1e-3
    with pytest.raises(ValueError, match="cannot hold"):
        decode_attention(q[:1], k_new[:1], v_new[:1], [caches[0][0]], [caches[0][1]], [101])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_head,n_kv,head_dim", [(9, 3, 64), (6, 2, 24), (4, 4, 32)])
def test_prompt_rows_through_the_c_attention(n_head, n_kv, head_dim, dtype):
    """A prompt's rows as rows of the C attention (models.base: every row of a prefill segment attends over its
    own causal prefix of the one cache; row blocks of 8 share each K/V read): the K/V of every row are in the
    cache before any row reads it, each row equals the numpy stage functions' causal attention, and each row's
    bits are those of the same row computed alone (a decode step), whatever the rows beside it - 1, 8 or 45 rows
    in a call, starting anywhere."""
    from llorch_cpud.kernels import decode_attention
    from llorch_cpud.models.llama import attention_heads, attention_scores

    rng = np.random.default_rng(7)
    start, n, max_seq = 19, 45, 80
    base = (rng.standard_normal((2, n_kv, max_seq, head_dim)) * 2).astype(dtype)
    q = rng.standard_normal((n, n_head, head_dim)).astype(np.float32) * 2
    k_new = rng.standard_normal((n, n_kv, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((n, n_kv, head_dim)).astype(np.float32)
    lengths = list(range(start + 1, start + n + 1))

    def run(rows: slice, cache):
        r = range(*rows.indices(n))
        return decode_attention(q[rows], k_new[rows], v_new[rows], [cache[0]] * len(r), [cache[1]] * len(r),
                                lengths[rows])

    c = base.copy()
    got = run(slice(None), c)  # [n, H·hd]
    assert np.array_equal(c[0][:, start : start + n], k_new.transpose(1, 0, 2).astype(dtype))
    k, v = c[0][:, : start + n].astype(np.float32), c[1][:, : start + n].astype(np.float32)
    ref = attention_heads(attention_scores(q, k, start), v)  # [n, H·hd], the causal mask over the prompt rows
    assert np.abs(got - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())
    for rows in (slice(0, 1), slice(3, 11), slice(5, 45, 1), slice(44, 45)):  # fewer rows, other block boundaries
        c2 = base.copy()
        first = rows.start
        if first:  # the positions before the call's first row are in the cache already (an earlier chunk)
            run(slice(0, first), c2)
        assert np.array_equal(run(rows, c2), got[rows]), rows
    # negative control: a row that saw a later row's key (no causal prefix) is off
    c3 = base.copy()
    leak = decode_attention(q[:1], k_new[:1], v_new[:1], [c3[0]], [c3[1]], [start + 2])
    assert np.abs(leak[0] - got[0]).max() > 1e-3


@pytest.mark.parametrize("n_head,n_kv,head_dim", [(9, 3, 64), (6, 2, 24), (16, 2, 128), (14, 2, 32)])
def test_decode_attention_on_float16_caches(n_head, n_kv, head_dim):
    """The q8 numerics' float16 KV cache: the kernel stores the new row rounded as numpy's astype(float16)
    (what cache_write's assignment stores) and attends over the widened values exactly as the numpy
    stage functions do over the same float16 cache; mixing dtypes is refused."""
    from llorch_cpud.kernels import decode_attention
    from llorch_cpud.models.llama import attention_heads, attention_scores

    rng = np.random.default_rng(6)
    lengths = [1, 33, 100]
    caches = [(rng.standard_normal((n_kv, 100, head_dim)) * 2).astype(np.float16) for _ in lengths]
    values = [(rng.standard_normal((n_kv, 100, head_dim))).astype(np.float16) for _ in lengths]
    q = rng.standard_normal((len(lengths), n_head, head_dim)).astype(np.float32) * 2
    k_new = rng.standard_normal((len(lengths), n_kv, head_dim)).astype(np.float32) * 3
    v_new = rng.standard_normal((len(lengths), n_kv, head_dim)).astype(np.float32)
    got = decode_attention(q, k_new, v_new, caches, values, lengths)  # [B, H·hd]
    for b, T in enumerate(lengths):
        assert np.array_equal(caches[b][:, T - 1], k_new[b].astype(np.float16))
        assert np.array_equal(values[b][:, T - 1], v_new[b].astype(np.float16))
        ref = attention_heads(attention_scores(q[b : b + 1], caches[b][:, :T], T - 1), values[b][:, :T])[0]
        assert np.abs(got[b] - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max()), (b, np.abs(got[b] - ref).max())
        exact = attention_heads(attention_scores(q[b : b + 1], caches[b][:, :T].astype(np.float32), T - 1),
                                values[b][:, :T].astype(np.float32))[0]
        assert np.abs(got[b] - exact).max() <= 2e-6 * max(1.0, np.abs(exact).max())  # widened exactly
    with pytest.raises(ValueError, match="float32, or every one float16"):
        decode_attention(q[:2], k_new[:2], v_new[:2], [caches[0], caches[1].astype(np.float32)], values[:2], lengths[:2])


@needs_c_path
@pytest.mark.parametrize("numerics", ["float32", "q8"])
def test_decode_steps_fast_path_equals_numpy_path(numerics):
    """A batched decode step of the quantized SmolLM2 (C attention for one-row segments) gives the
    logits the numpy attention path gives (trace forces that path) to float32 rounding. In the q8
    numerics (float16 KV cache) the two attentions' float32 rounding differences can flip an 8-bit
    activation rounding in a later layer, which moves logits by up to ~1 (measured 0.75 with a float32
    cache too): there the bound is the q8 profile's checkpoint-8 tolerance."""
    from llorch_cpud.validate.checkpoints import NUMERICS_TOLERANCES
    from llorch_cpud.formats import default_model_path
    from llorch_cpud.formats.gguf import GGUFFile
    from llorch_cpud.models.base import Segment
    from llorch_cpud.formats.gguf_load import load_llama

    path = default_model_path()
    if not path.exists():
        pytest.skip("SmolLM2 GGUF not installed")
    model = load_llama(GGUFFile.open(path), numerics=numerics)
    assert model.new_cache(4).k.dtype == (np.float16 if numerics == "q8" else np.float32)
    prompts = [[1, 504, 3458, 282], [1, 9690, 28, 2115, 314, 253, 1345], [1, 42]]
    caches = [model.new_cache(16) for _ in prompts]
    for p, c in zip(prompts, caches):
        model.forward(np.array(p), [Segment(c, 0, len(p))])
    segs = [Segment(c, len(p), 1) for p, c in zip(prompts, caches)]
    tokens = np.array([28, 29, 30])
    fast = model.logits(model.forward(tokens, segs))  # [3, vocab]
    slow = model.logits(model.forward(tokens, segs, trace={}))  # same positions rewritten, numpy attention
    if numerics == "q8":
        assert np.abs(fast - slow).max() <= NUMERICS_TOLERANCES["q8"][8]
    else:
        assert np.abs(fast - slow).max() <= 1e-3 and (fast.argmax(-1) == slow.argmax(-1)).all()


@pytest.mark.parametrize("shape", [(2304, 768), (50, 96), (16, 3072), (7, 40)])
def test_packed_float32_matches_float64_product(shape):
    """PackedMatrix (GPT-2's projections and head): x @ W.T within BLAS-sized rounding of float64,
    for every tile remainder, exact unpacking and row lookup, bit-identical rows across batches."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    p = PackedMatrix.from_dense(np.asfortranarray(w))  # GPT-2's Conv1D weights arrive Fortran-ordered
    assert np.array_equal(p.dequantize(), w) and np.array_equal(as_dense(p), w)
    ids = np.array([0, shape[0] - 1, shape[0] // 2])
    assert np.array_equal(p.rows(ids), w[ids]) and np.array_equal(take_rows(p, ids), w[ids])
    for rows in (1, 3, 8, 11, 33):
        x = rng.standard_normal((rows, shape[1])).astype(np.float32)
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        y = linear(x, p)
        assert y.shape == (rows, shape[0])
        assert np.abs(y - ref).max() <= 4 * np.abs(x @ w.T - ref).max() + 1e-6
        assert np.array_equal(y[1:2], p.matmul(x[1:2]))  # a row alone = the same row in a batch
    bad = PackedMatrix(p.shape, p.w.copy())
    bad.w[0, 5, 3] += 1.0  # negative control: one wrong weight shows in row 3's outputs
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    assert np.abs(bad.matmul(x)[:, 3] - p.matmul(x)[:, 3]).max() > 1e-3


def test_fused_views_compute_what_separate_matrices_do():
    rng = np.random.default_rng(7)
    ws = [(rng.standard_normal((n, 64)) * 0.1).astype(np.float32) for n in (64, 32, 32)]
    parts = PackedMatrix.fuse([PackedMatrix.from_dense(w) for w in ws])
    x = rng.standard_normal((5, 64)).astype(np.float32)
    together = linear_many(x, parts)  # one kernel call
    for part, w, y in zip(parts, ws, together):
        assert part.parent is not None and np.array_equal(y, PackedMatrix.from_dense(w).matmul(x))
    assert PackedMatrix.fuse([PackedMatrix.from_dense(ws[0][:10])]) is None  # 10 rows: not whole chunks
    raws = [make_blocks("Q4_1", n, 64, seed=n)[0] for n in (64, 32)]
    qparts = QuantMatrix.fuse([QuantMatrix.from_blocks("Q4_1", r, (n, 64)) for r, n in zip(raws, (64, 32))])
    for part, r, n, y in zip(qparts, raws, (64, 32), linear_many(x, qparts)):
        assert np.array_equal(y, QuantMatrix.from_blocks("Q4_1", r, (n, 64)).matmul(x))


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(576, 576), (50, 96), (7, 40)])
def test_packed_16bit_storage_computes_the_float32_product_of_its_values(shape, storage):
    """A GGUF F16 / BF16 matrix kept at 16 bits: the same products, bit for bit, as the float32 packing of
    the same values (each 16-bit value widens exactly), with half the bytes."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if storage == "float16":
        w16 = w.astype(np.float16)
        values = w16.astype(np.float32)
        p16 = PackedMatrix.from_dense(w16, storage=np.float16)
    else:
        values = ((w.view(np.uint32) >> 16) << 16).view(np.float32)  # truncated to bfloat16 values
        p16 = PackedMatrix.from_dense(values, storage="bfloat16")
    p32 = PackedMatrix.from_dense(values)
    assert p16.w.itemsize == 2 and p16.nbytes * 2 == p32.nbytes
    assert np.array_equal(p16.dequantize(), values)
    ids = np.array([0, shape[0] - 1, shape[0] // 2])
    assert np.array_equal(p16.rows(ids), values[ids])
    for rows in (1, 3, 8, 11):
        x = rng.standard_normal((rows, shape[1])).astype(np.float32)
        y = p16.matmul(x)
        assert np.array_equal(y, p32.matmul(x))
        ref = x.astype(np.float64) @ values.astype(np.float64).T
        assert rel_err(y, ref) < 1e-5
    # negative control: one wrong weight is seen in the product
    bad = PackedMatrix(p16.shape, p16.w.copy())
    bad.w.view(np.uint16)[0, 0, 0] ^= 0x4000  # an exponent bit
    x = np.ones((1, shape[1]), np.float32)
    assert np.abs(bad.matmul(x) - p16.matmul(x)).max() > 0.01
    with pytest.raises(ValueError, match="float16 matrix"):
        PackedMatrix.from_dense(w, storage=np.float16)  # values would be rounded
    with pytest.raises(ValueError, match="not bfloat16"):
        PackedMatrix.from_dense(w, storage="bfloat16")  # values would be truncated


def random_blocks(kind: str, n_out: int, n_in: int, seed: int, scales=None) -> np.ndarray:
    """Random bytes for every field of `kind`'s blocks, with float16 scales drawn from `scales` (default:
    very different sizes, subnormal to large, zero and negative included): raw [n_out, row bytes]."""
    from llorch_cpud.kernels.quantized import _BLOCKS

    per, size = _BLOCKS[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_out, n_in // per, size), dtype=np.uint8)
    if scales is None:
        scales = np.array([1e-4, -3.5, 6.0e-8, 0.02, 1000.0, -0.0, 7.0, 2.0 ** -14], np.float16)
    at = {"Q4_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kind]  # float16 scales' offsets
    for o in at:
        pick = scales[rng.integers(0, len(scales), blocks.shape[:2])]
        blocks[..., o : o + 2] = pick[..., None].view(np.uint8).reshape(blocks.shape[:2] + (2,))
    return blocks.reshape(n_out, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_rewritten_blocks_keep_every_weight_including_extremes(kind):
    """Every bit pattern of every field and extreme scales survive the rewrite into a kernel kind
    exactly (against gguf-py's dequantizer); a flipped bit (negative control) changes the weights."""
    raw = random_blocks(kind, 64, 512, seed=7)
    ref = dequantize(raw, GGMLQuantizationType[kind]).reshape(64, 512)
    m = QuantMatrix.from_blocks(kind, raw, (64, 512))
    kinds = {"Q4_0": "Q4_1", "Q5_0": "Q8_0", "Q5_1": "Q8_DM", "Q4_K": "Q4_1F", "Q5_K": "Q8_DM", "Q6_K": "Q8_S16"}
    assert m.source == kind and m.kind == kinds[kind]
    assert np.array_equal(m.dequantize(), ref)
    assert np.array_equal(m.rows(np.array([5, 63])), ref[[5, 63]])
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    assert rel_err(m.matmul(x), x.astype(np.float64) @ ref.astype(np.float64).T) < 1e-5
    flips = {"Q4_0": (5,), "Q5_0": (2, 10), "Q5_1": (3, 4, 12), "Q4_K": (4, 12, 20), "Q5_K": (9, 20, 60),
             "Q6_K": (3, 130, 195)}
    for byte in flips[kind]:
        bad = raw.copy()
        bad[:, byte] ^= 16 if byte != 195 else 1  # a quant's bit, a high bit, a packed scale/min bit
        assert not np.array_equal(QuantMatrix.from_blocks(kind, bad, (64, 512)).dequantize(), ref), byte


def test_q4_0_scale_that_overflows_is_refused():
    from llorch_cpud.kernels.quantized import split_blocks

    huge = np.zeros((1, 1, 18), np.uint8)
    huge[0, 0, 0:2] = np.array([10000.0], np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="overflow"):
        split_blocks("Q4_0", huge)


@pytest.mark.parametrize("rows,n", [(1, 576), (8, 768), (3, 100), (5, 17), (300, 64)])
def test_elementwise_kernels_match_the_numpy_stage_functions(rows, n):
    """kernels.ops' norms, activations and RoPE (a decode step's elementwise stages) compute the models'
    stage functions to float32 rounding - on column slices of a fused product as the models pass them,
    row lengths with a tail past the last 16 lanes, values where exp under- or overflows - and a
    deliberately different input (eps, one element) is caught at the same bound."""
    from llorch_cpud.kernels import ops
    from llorch_cpud.models import gpt2, llama

    rng = np.random.default_rng(rows * 1000 + n)
    fused = (rng.standard_normal((rows, 3 * n)) * 4 + 0.5).astype(np.float32)  # [rows, 3n]: slices like linear_many's
    fused[0, :4] = [-120.0, -88.5, 89.0, 150.0]  # exp(-x) under/overflow in silu and gelu
    x, g, u = fused[:, :n], fused[:, n : 2 * n], fused[:, 2 * n :]
    w, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)

    def close(got, ref, rel=3e-7):
        return np.abs(got - ref).max() <= rel * max(1.0, np.abs(ref).max())

    assert close(ops.rms_norm(x, w, 1e-5), llama.rms_norm(x, w, 1e-5))
    assert not close(ops.rms_norm(x, w, 1e-1), llama.rms_norm(x, w, 1e-5))
    assert close(ops.layer_norm(x, w, b, 1e-5), gpt2.layer_norm(x, w, b, 1e-5))
    assert not close(ops.layer_norm(x, w, b, 1e-5), gpt2.layer_norm(x, w, b * 1.001, 1e-5))
    with np.errstate(over="ignore", invalid="ignore"):
        assert close(ops.silu_mul(g, u), llama.silu(g) * u)
        assert close(ops.gelu_new(x, gpt2.GELU_C, gpt2.GELU_K), gpt2.gelu_new(x))
    shifted = g.copy()
    shifted[-1, -1] += 1.0
    assert not close(ops.silu_mul(shifted, u), llama.silu(g) * u)
    assert not close(ops.gelu_new(x, gpt2.GELU_C, gpt2.GELU_K), llama.silu(x))  # the wrong activation is far off

    hd = 16 if n % 16 else 64
    if n % hd == 0:  # RoPE over n // hd heads of a column slice
        heads = n // hd
        ang = np.outer(np.arange(rows) + 7, 1.0 / 10000 ** (np.arange(0, hd, 2) / hd))  # [rows, hd/2]
        cos, sin = (np.concatenate([f(ang), f(ang)], -1).astype(np.float32) for f in (np.cos, np.sin))  # [rows, hd]
        q = x.reshape(rows, heads, hd)
        assert close(ops.rope(q, cos, sin), llama.apply_rope(q, cos, sin))
        assert not close(ops.rope(q, cos, -sin), llama.apply_rope(q, cos, sin))


def test_elementwise_kernels_refuse_mismatched_operands():
    from llorch_cpud.kernels import _qkernels, ops

    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="weight: expected float32 rows"):
        _qkernels.rowwise(ops.RMS_NORM, x, np.zeros((1, 7), np.float32), None, np.empty_like(x), 2, 8, 0, 1e-5, 0.0)
    with pytest.raises(ValueError, match="out: expected float32 rows"):
        _qkernels.rowwise(ops.SILU_MUL, x, x, None, np.empty((2, 8), np.float64), 2, 8, 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="x: expected float32 rows .* contiguous columns"):
        _qkernels.rowwise(ops.GELU_NEW, np.zeros((8, 2), np.float32).T, None, None, np.empty_like(x), 2, 8, 0, 0.8, 0.04)
    with pytest.raises(ValueError, match="head_dim 3 must be even"):
        _qkernels.rowwise(ops.ROPE, x, x, x, np.empty_like(x), 2, 8, 3, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown op 9"):
        _qkernels.rowwise(9, x, None, None, np.empty_like(x), 2, 8, 0, 0.0, 0.0)
