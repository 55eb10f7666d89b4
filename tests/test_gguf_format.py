"""GGUF reading (llorch_cpud.formats.gguf): metadata, shapes, dequantization, errors.

Dequantization is checked bit for bit against an independent implementation, Candle's
Python bindings (`candle-nn`, Rust ggml-compatible kernels):
- real tensors of the SmolLM2-135M-Instruct GGUF (Q8_0 embedding, Q4_1 matrices, F32 norms);
- tensors quantized by Candle itself (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K F16 F32),
  written by Candle's GGUF writer;
- tensors quantized by gguf-py (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 F16 F32), written by gguf-py's writer,
  read back by Candle. BF16, which candle-nn 0.4 cannot read, is checked against torch's bfloat16.
"""

from __future__ import annotations

import os
import shutil
import struct
import time

import numpy as np
import pytest

import gguf
from gguf.constants import GGMLQuantizationType as QT

from llorch_cpud.errors import ModelLoadError
from llorch_cpud.formats.gguf import SUPPORTED_TYPES, GGUFFile

REQUIRED_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smol(smollm_path) -> GGUFFile:
    return GGUFFile.open(smollm_path)


@pytest.fixture(scope="module")
def stock_reader(smollm_path):
    """gguf-py's own reader, unmodified, as the reference for layout and metadata."""
    return gguf.GGUFReader(smollm_path)


@pytest.fixture(scope="module")
def candle():
    try:
        import candle as candle_mod
    except ImportError:
        pytest.skip("candle-nn is not installed (pip install candle-nn): no independent dequantization reference")
    return candle_mod


@pytest.fixture(scope="module")
def candle_smol(candle, smollm_path):
    tensors, metadata = candle.utils.load_gguf(smollm_path)
    return tensors, metadata


def candle_np(qtensor) -> np.ndarray:
    """A Candle QTensor dequantized by Candle, as float32 numpy."""
    t = qtensor.dequantize()
    return np.array(t.values(), dtype=np.float32).reshape(tuple(t.shape))


def test_data(shape, seed=0) -> np.ndarray:
    """Normal data with rows of very different scales, an all-zero block, a constant block and outliers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    rows *= (10.0 ** rng.integers(-4, 3, size=(rows.shape[0], 1))).astype(np.float32)
    width = shape[-1]
    rows[0, :256] = 0.0
    rows[1, width - 256 :] = 0.125
    rows[-1, 7] = 1e3
    rows[-1, width - 5] = -1e3
    return rows.reshape(shape)


test_data.__test__ = False  # not a test


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, QT]], kv: dict | None = None, arch="llama", alignment=None):
    """A small GGUF written by gguf-py: tensors as (already quantized array, type)."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_array(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ---------------------------------------------------------------------------- real file: metadata and layout


def test_open_is_fast_and_metadata_is_plain_python(smollm_path):
    t0 = time.perf_counter()
    f = GGUFFile.open(smollm_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"opening took {elapsed:.2f}s"
    md = f.metadata
    assert f.path == smollm_path
    assert f.architecture == "llama"
    assert f.version == 3
    assert md["llama.block_count"] == 30
    assert md["llama.embedding_length"] == 576
    assert md["llama.attention.head_count"] == 9
    assert md["llama.attention.head_count_kv"] == 3
    assert md["llama.rope.freq_base"] == 100000.0
    assert md["llama.feed_forward_length"] == 1536
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == "smollm"
    assert md["tokenizer.ggml.add_bos_token"] is False
    tokens = md["tokenizer.ggml.tokens"]
    assert type(tokens) is list and len(tokens) == 49152 and all(type(t) is str for t in tokens)
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = md["tokenizer.ggml.merges"]
    assert len(merges) == 48900 and merges[0] == "Ġ t"
    types = md["tokenizer.ggml.token_type"]
    assert len(types) == 49152 and all(type(t) is int for t in types)
    for key, value in md.items():
        assert type(value) in (str, int, float, bool, list), (key, type(value))
        if isinstance(value, list):
            assert all(type(v) in (str, int, float, bool) for v in value[:100]), key
    assert f.get("no.such.key", 7) == 7
    assert f.require("llama.block_count", int) == 30


def test_metadata_equals_gguf_reader_and_candle(smol, stock_reader, candle_smol):
    reference = stock_reader  # stock reader, stock decoding
    expected = {k: v.contents() for k, v in reference.fields.items() if not k.startswith("GGUF.")}
    assert smol.metadata == expected
    _, candle_md = candle_smol
    assert set(candle_md) == set(smol.metadata)
    for key, value in candle_md.items():
        ours = smol.metadata[key]
        if isinstance(ours, float):
            assert ours == pytest.approx(value, rel=1e-7), key
        else:
            assert ours == value, key


def test_tensor_layout_equals_gguf_reader(smol, stock_reader):
    reference = stock_reader
    assert smol.tensor_names() == [t.name for t in reference.tensors]
    for t in reference.tensors:
        info = smol.info(t.name)
        assert info.type_name == t.tensor_type.name
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes
        raw = smol.raw(t.name)
        assert raw.dtype == np.uint8 and not raw.flags.writeable
        assert raw.tobytes() == np.asarray(t.data).tobytes()


def test_llama_shapes_are_pytorch_linear_orientation(smol):
    assert "output.weight" not in smol  # tied embeddings
    assert len(smol.tensor_names()) == 272
    expect = {
        "token_embd.weight": ("Q8_0", (49152, 576)),
        "blk.0.attn_q.weight": ("Q4_1", (576, 576)),
        "blk.0.attn_k.weight": ("Q4_1", (192, 576)),  # [n_kv_head * head_dim, n_embd] = [out, in]
        "blk.0.attn_v.weight": ("Q4_1", (192, 576)),
        "blk.0.attn_output.weight": ("Q4_1", (576, 576)),
        "blk.0.ffn_gate.weight": ("Q4_1", (1536, 576)),
        "blk.0.ffn_up.weight": ("Q4_1", (1536, 576)),
        "blk.0.ffn_down.weight": ("Q4_1", (576, 1536)),
        "blk.0.attn_norm.weight": ("F32", (576,)),
        "output_norm.weight": ("F32", (576,)),
    }
    for name, (ttype, shape) in expect.items():
        assert smol.tensor_info(name) == (ttype, shape), name
        arr = smol.tensor(name)
        assert arr.shape == shape and arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.writeable
    assert smol.tensor("blk.0.attn_norm.weight", dtype=np.float64).dtype == np.float64


def test_real_tensors_bit_identical_to_candle_and_gguf_py(smol, stock_reader, candle_smol):
    """Q8_0, Q4_1 and F32 from the real file: ours == Candle's dequantization == gguf-py's, bit for bit."""
    ctensors, _ = candle_smol
    reference = {t.name: t for t in stock_reader.tensors}
    names = [n for n in smol.tensor_names() if n.startswith(("blk.0.", "blk.29.", "output_norm"))]
    seen_types = set()
    for name in names:
        ours = smol.tensor(name)
        theirs = candle_np(ctensors[name])
        assert ctensors[name].ggml_dtype.replace("_", "") == smol.tensor_info(name)[0].replace("_", "")
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
        t = reference[name]
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape))
        seen_types.add(smol.tensor_info(name)[0])
    # the Q8_0 embedding: first and last 2048 rows through Candle (the whole of it is slow to copy out of Candle)
    embd = smol.tensor("token_embd.weight")
    cembd = ctensors["token_embd.weight"].dequantize()
    for start in (0, 49152 - 2048):
        part = np.array(cembd.narrow(0, start, 2048).values(), dtype=np.float32)
        np.testing.assert_array_equal(embd[start : start + 2048], part)
    t = reference["token_embd.weight"]
    np.testing.assert_array_equal(embd, gguf.quants.dequantize(t.data, t.tensor_type))
    seen_types.add("Q8_0")
    assert seen_types == {"Q8_0", "Q4_1", "F32"}
    # values are sane: finite, and the norms are not all ones
    assert np.isfinite(embd).all()
    assert not np.allclose(smol.tensor("output_norm.weight"), 1.0)


def test_full_file_dequantization_time(smol):
    t0 = time.perf_counter()
    n = 0
    for _, arr in smol.tensors():
        n += arr.size
    elapsed = time.perf_counter() - t0
    assert n == 134_515_008
    assert elapsed < 10.0, f"dequantizing SmolLM2 to float32 took {elapsed:.2f}s"


# ---------------------------------------------------------------------------- synthetic tensors, every type

CANDLE_TYPES = {  # candle quantize() name -> ggml type name
    "f32": "F32", "f16": "F16", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
    "q2k": "Q2_K", "q3k": "Q3_K", "q4k": "Q4_K", "q5k": "Q5_K", "q6k": "Q6_K",
}
SHAPES = [(6, 512), (2, 3, 256)]


@pytest.fixture(scope="module")
def candle_quantized_file(candle, tmp_path_factory):
    """Every type Candle can quantize, quantized and written to GGUF by Candle."""
    qtensors = {}
    for i, shape in enumerate(SHAPES):
        x = candle.Tensor(test_data(shape, seed=i))
        for cname in CANDLE_TYPES:
            qtensors[f"{cname}.{i}"] = x.quantize(cname)
    path = str(tmp_path_factory.mktemp("candle") / "candle_types.gguf")
    candle.utils.save_gguf(path, qtensors, {"general.architecture": "llama", "test.n": 3})
    return path, qtensors


@pytest.mark.parametrize("cname", list(CANDLE_TYPES))
def test_candle_quantized_types_bit_identical(candle_quantized_file, cname):
    path, qtensors = candle_quantized_file
    f = GGUFFile.open(path)
    for i, shape in enumerate(SHAPES):
        name = f"{cname}.{i}"
        assert f.tensor_info(name) == (CANDLE_TYPES[cname], shape)
        ours = f.tensor(name)
        theirs = candle_np(qtensors[name])
        assert ours.shape == shape
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
        if cname != "f32":  # a real quantization happened: not the input back
            assert not np.array_equal(ours, test_data(shape, seed=i))


GGUF_PY_TYPES = [QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]


@pytest.fixture(scope="module")
def gguf_py_quantized_file(tmp_path_factory):
    """Types gguf-py can quantize, written by gguf-py's GGUFWriter (with a non-default alignment)."""
    tensors = {}
    for i, shape in enumerate(SHAPES):
        x = test_data(shape, seed=10 + i)
        for qt in GGUF_PY_TYPES:
            tensors[f"{qt.name.lower()}.{i}"] = (gguf.quants.quantize(x, qt), qt)
    path = tmp_path_factory.mktemp("ggufpy") / "ggufpy_types.gguf"
    return write_gguf(path, tensors, {"test.flag": True}, alignment=64), tensors


@pytest.fixture(scope="module")
def gguf_py_bf16_file(tmp_path_factory):
    """BF16 in a file of its own: candle-nn 0.4 refuses to open a GGUF holding a BF16 tensor."""
    tensors = {f"bf16.{i}": (gguf.quants.quantize(test_data(shape, seed=10 + i), QT.BF16), QT.BF16)
               for i, shape in enumerate(SHAPES)}
    return write_gguf(tmp_path_factory.mktemp("bf16") / "bf16.gguf", tensors)


@pytest.mark.parametrize("qtype", GGUF_PY_TYPES, ids=lambda q: q.name)
def test_gguf_py_quantized_types_match_candle(gguf_py_quantized_file, candle, qtype):
    path, tensors = gguf_py_quantized_file
    f = GGUFFile.open(path)
    assert f.alignment == 64 and f.metadata["test.flag"] is True
    ctensors, _ = candle.utils.load_gguf(path)
    for i, shape in enumerate(SHAPES):
        name = f"{qtype.name.lower()}.{i}"
        assert f.tensor_info(name) == (qtype.name, shape)
        ours = f.tensor(name)
        np.testing.assert_array_equal(ours, candle_np(ctensors[name]), err_msg=name)
        data, _ = tensors[name]
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(data, qtype).reshape(shape))


def test_bf16_matches_torch(gguf_py_bf16_file):
    torch = pytest.importorskip("torch")
    path = gguf_py_bf16_file
    f = GGUFFile.open(path)
    for i, shape in enumerate(SHAPES):
        name = f"bf16.{i}"
        assert f.tensor_info(name) == ("BF16", shape)
        raw = f.raw(name)
        bits = torch.from_numpy(raw.copy().view(np.int16).reshape(shape))
        expected = bits.view(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(f.tensor(name), expected)
        # and bf16 of the source data, rounded by torch, is what gguf-py stored
        src = torch.from_numpy(test_data(shape, seed=10 + i)).to(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(f.tensor(name), src)


def test_required_types_are_supported():
    assert set(REQUIRED_TYPES) <= SUPPORTED_TYPES


def test_raw_block_layout(candle_quantized_file):
    path, _ = candle_quantized_file
    f = GGUFFile.open(path)
    # Q4_K: 256 values per 144-byte block; Q6_K: 256 per 210; Q8_0: 32 per 34
    assert f.raw("q4k.0").shape == (6, 2 * 144)
    assert f.raw("q6k.1").shape == (2, 3, 210)
    assert f.raw("q8_0.0").shape == (6, 16 * 34)
    assert f.raw("f32.0").shape == (6, 512 * 4)


# ---------------------------------------------------------------------------- errors


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError) as exc:
        GGUFFile.open(path)
    msg = one_line(exc)
    assert path in msg and "not found" in msg


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        GGUFFile.open(tmp_path)
    assert str(tmp_path) in one_line(exc)


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04" + b"\0" * 100, b"GGML" + b"\0" * 100])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as exc:
        GGUFFile.open(path)
    msg = one_line(exc)
    assert str(path) in msg and "not a GGUF" in msg


def test_truncated_tensor_data(smollm_path, smol, tmp_path):
    """A copy of the real file cut inside the tensor data: named file, named tensor, byte counts."""
    infos = sorted((smol.info(n) for n in smol.tensor_names()), key=lambda i: i.offset)
    victim = infos[3]
    cut = victim.offset + victim.n_bytes // 2
    path = tmp_path / "truncated.gguf"
    with open(smollm_path, "rb") as src:
        path.write_bytes(src.read(cut))
    with pytest.raises(ModelLoadError) as exc:
        GGUFFile.open(path)
    msg = one_line(exc)
    assert str(path) in msg and "truncated" in msg and repr(victim.name) in msg and str(cut) in msg


@pytest.mark.parametrize("cut", [30, 1000, 800_000, 1_785_000])
def test_truncated_header(smollm_path, tmp_path, cut):
    """Cut inside the metadata (tokens, merges) or the tensor-info table."""
    path = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as src:
        path.write_bytes(src.read(cut))
    with pytest.raises(ModelLoadError) as exc:
        GGUFFile.open(path)
    msg = one_line(exc)
    assert str(path) in msg and ("truncated" in msg or "corrupt" in msg)


def test_unsupported_version(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", {"w": (np.zeros((2, 32), np.float32), QT.F32)})
    data = bytearray(open(path, "rb").read())
    data[4:8] = struct.pack("<I", 1)  # GGUF v1: a different, older layout
    open(path, "wb").write(data)
    with pytest.raises(ModelLoadError) as exc:
        GGUFFile.open(path)
    msg = one_line(exc)
    assert path in msg and "version" in msg


def test_unsupported_tensor_type_known_to_gguf(tmp_path):
    """Q8_1 is a valid ggml type (activations only) that nothing here dequantizes: named tensor and type."""
    block, size = gguf.GGML_QUANT_SIZES[QT.Q8_1]
    q8_1 = np.zeros((4, 2 * size), dtype=np.uint8)  # 4 rows of 2 blocks
    path = write_gguf(tmp_path / "q81.gguf", {"blk.0.odd.weight": (q8_1, QT.Q8_1), "ok": (np.ones(32, np.float32), QT.F32)})
    f = GGUFFile.open(path)  # the file itself is fine
    assert f.tensor_info("blk.0.odd.weight") == ("Q8_1", (4, 2 * block))
    assert f.raw("blk.0.odd.weight").shape == (4, 2 * size)
    np.testing.assert_array_equal(f.tensor("ok"), np.ones(32, np.float32))
    with pytest.raises(ModelLoadError) as exc:
        f.tensor("blk.0.odd.weight")
    msg = one_line(exc)
    assert path in msg and "'blk.0.odd.weight'" in msg and "Q8_1" in msg and "unsupported" in msg


def test_unknown_tensor_type_id(tmp_path):
    """A type id gguf has never heard of: the file opens, the tensor is named when asked for."""
    name = "blk.0.future.weight"
    path = write_gguf(tmp_path / "t99.gguf", {name: (np.zeros((2, 32), np.float32), QT.F32)})
    data = bytearray(open(path, "rb").read())
    pos = data.index(name.encode()) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    type_pos = pos + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_pos)[0] == QT.F32.value
    struct.pack_into("<I", data, type_pos, 99)
    open(path, "wb").write(data)
    f = GGUFFile.open(path)
    assert f.tensor_info(name) == ("UNKNOWN_99", (2, 32))
    for read in (f.tensor, f.raw):
        with pytest.raises(ModelLoadError) as exc:
            read(name)
        msg = one_line(exc)
        assert path in msg and repr(name) in msg and "99" in msg and "unsupported" in msg


def test_missing_required_key_and_tensor(tmp_path):
    path = write_gguf(tmp_path / "k.gguf", {"w": (np.zeros((2, 32), np.float32), QT.F32)}, {"llama.block_count": 2})
    f = GGUFFile.open(path)
    assert f.require("llama.block_count") == 2
    with pytest.raises(ModelLoadError) as exc:
        f.require("llama.embedding_length")
    msg = one_line(exc)
    assert path in msg and "'llama.embedding_length'" in msg and "missing" in msg
    with pytest.raises(ModelLoadError) as exc:
        f.require("llama.block_count", str)
    assert "'llama.block_count'" in one_line(exc)
    with pytest.raises(ModelLoadError) as exc:
        f.tensor("output.weight")
    msg = one_line(exc)
    assert path in msg and "'output.weight'" in msg
    with pytest.raises(ModelLoadError):
        f.tensor_info("output.weight")


def test_missing_architecture_key(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"w": (np.zeros((2, 32), np.float32), QT.F32)})
    data = open(path, "rb").read().replace(b"general.architecture", b"general.architecturX")
    open(path, "wb").write(data)
    f = GGUFFile.open(path)
    with pytest.raises(ModelLoadError) as exc:
        f.architecture
    msg = one_line(exc)
    assert path in msg and "'general.architecture'" in msg


def test_copy_of_real_file_reads_identically(smollm_path, smol, tmp_path):
    """Sanity check that the truncation test's copies are faithful: an untruncated copy opens and agrees."""
    path = tmp_path / "copy.gguf"
    shutil.copyfile(smollm_path, path)
    with GGUFFile.open(path) as f:
        assert f.metadata == smol.metadata
        np.testing.assert_array_equal(f.tensor("blk.7.attn_v.weight"), smol.tensor("blk.7.attn_v.weight"))
