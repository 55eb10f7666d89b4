"""GGUF reading: metadata as plain Python values, tensors dequantized to numpy.

The container format is parsed by the `gguf` PyPI package (llama.cpp's own Python
reader, `gguf.GGUFReader`, memory-mapped) and quantized blocks are decoded by
`gguf.quants.dequantize`, which is verified bit for bit against Candle in
tests/test_gguf_format.py. This module adds what a model loader needs on top:

- fast, plain metadata (`dict[str, Any]` of str/int/float/bool/lists);
- numpy row-major tensors whose last axis is ggml's ne[0], so a Llama projection
  weight comes out `[n_out, n_in]` like a PyTorch `nn.Linear.weight`;
- one-line `ModelLoadError`s naming the file and the tensor or key at fault, for a
  missing file, a file that is not GGUF, a truncated file, an unsupported tensor
  type and a missing metadata key - never a traceback from gguf internals;
- a hostile file costs bounded work: every count, length and dimension read from
  the header is checked against the bytes the file has left before anything is
  allocated or looped over for it (llama.cpp's own rules where it has them: no
  nested arrays, no duplicate keys, at most 4 dimensions, none negative as int64,
  aligned tensor data that lies inside the file without overlapping).

Usage:

    f = GGUFFile.open("model.gguf")
    f.architecture                      # "llama"
    f.require("llama.block_count")     # 30, or ModelLoadError naming the key
    w = f.tensor("blk.0.attn_q.weight")  # float32 [576, 576]
"""

from __future__ import annotations

import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from llorch_cpud.errors import ModelLoadError

try:  # the reader is required; a missing package is a load error, not an ImportError at import time
    import gguf as _gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
    import gguf.quants as _gguf_quants
except ImportError as _exc:  # pragma: no cover - the package is a hard dependency
    _gguf = None
    _GGUF_IMPORT_ERROR: ImportError | None = _exc
else:
    _GGUF_IMPORT_ERROR = None

__all__ = ["GGUFFile", "GGUFTensorInfo", "SUPPORTED_TYPES", "gguf_version"]

GGUF_MAGIC = b"GGUF"

# Plain numeric ggml types: stored as the numpy dtype below, cast on read.
_PLAIN_TYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}


def _dequantizable_types() -> frozenset[str]:
    if _gguf is None:  # pragma: no cover
        return frozenset()
    names = set(_PLAIN_TYPES)
    names.update(t.name for t in getattr(_gguf_quants, "_type_traits", {}))
    if not getattr(_gguf_quants, "_type_traits", None):  # pragma: no cover - future gguf without the registry
        names.update({"BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
    return frozenset(names)


#: ggml type names `GGUFFile.tensor` can dequantize (gguf-py's decoders plus plain numeric types).
SUPPORTED_TYPES: frozenset[str] = _dequantizable_types()


def gguf_version() -> str:
    """Version of the installed `gguf` package (for validation reports)."""
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # pragma: no cover
        return "unknown"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _q(name: str, limit: int = 80) -> str:
    """repr of a name read from the file, cut to `limit` characters: a message stays one short line."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


class _Corrupt(ValueError):
    """A header value the file cannot back; the message names the key/tensor, `GGUFFile.open` adds the path."""


GGML_MAX_DIMS = 4  # llama.cpp refuses a tensor with more dimensions
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value (a uint8)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset (no name, no dimensions)


# --------------------------------------------------------------------------- reader


if _gguf is not None:

    class _Reader(_gguf.GGUFReader):
        """`gguf.GGUFReader` with two overrides, both about what it does per element.

        - `_get`: the stock reader slices an `np.memmap`, and every slice of a memmap
          subclass runs `memmap.__array_finalize__`; with ~100k vocabulary strings that is
          ~1.5 s of the ~2 s open. Slicing a plain `ndarray` view of the same mapping
          gives identical bytes (still memory-mapped, still read-only) in a third of it.
        - `_build_tensors`: the stock version raises bare `ValueError`s (unknown type id,
          data past the end of the file) without naming the tensor; this one only records
          each tensor's name, dims, type id and offset, and `GGUFFile` checks them.
        - `_build_fields`, `_get_str`, `_get_field_parts`, `_build_tensor_info`: the stock
          parsing, with every count and length checked against the bytes left before it is
          used (the stock reader loops over an array's declared length even past the end of
          the file: 2^40 elements ran out of memory), `_Corrupt` naming the key or tensor,
          and each array's elements read in one piece: numbers as one numpy view, strings
          decoded straight to a list of str (not one or two views per element).
        """

        _raw_tensors: list[tuple[str, tuple[int, ...], int, int]]

        def _get(self, offset, dtype, count=1, override_order=None):  # noqa: D401 - same contract as gguf's
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
                self._dtypes = {}
            order = self.byte_order if override_order is None else override_order
            key = (dtype, order)
            dt = self._dtypes.get(key)
            if dt is None:
                dt = self._dtypes[key] = np.dtype(dtype).newbyteorder(order)
            count = int(count)
            return plain[offset : offset + dt.itemsize * count].view(dt)[:count]

        def _need(self, offs: int, n: int, what: str) -> None:
            """Nothing, if the file has n bytes at offs; else _Corrupt saying what needed them."""
            size = self._plain.shape[0]
            if n > size - offs:
                raise _Corrupt(f"{what} at byte {offs} needs {n} bytes, but the file has {size} "
                               f"(truncated or corrupt GGUF file)")

        def _fits(self, count: int, offs: int, least: int, what: str) -> None:
            """Nothing, if `count` items of at least `least` bytes each can follow offs; else _Corrupt."""
            left = self._plain.shape[0] - offs
            if count > left // least:
                raise _Corrupt(f"{what} {count} is impossible: the {left} bytes left after byte {offs} hold at most "
                               f"{left // least} (truncated or corrupt GGUF file)")

        def _value_type(self, raw: int, what: str = "value type") -> GGUFValueType:
            try:
                return GGUFValueType(int(raw))
            except ValueError:
                raise _Corrupt(f"unknown {what} id {int(raw)}") from None

        def _get_str(self, offset):
            self._need(offset, 8, "a string length")
            slen = self._get(offset, np.uint64)
            n = int(slen[0])
            self._need(offset + 8, n, f"a string of {n} bytes")
            return slen, self._get(offset + 8, np.uint8, n)

        def _strings(self, offs: int, n: int) -> tuple[list[str], int]:
            """n length-prefixed strings from offs, decoded (invalid UTF-8 replaced): (strings, end offset)."""
            self._fits(n, offs, 8, "array length (of strings)")
            buf = memoryview(self._plain)
            size = len(buf)
            little = (sys.byteorder == "little") == (self.byte_order == "I")
            length = struct.Struct("<Q" if little else ">Q").unpack_from
            out = []
            append = out.append
            for i in range(n):
                if offs + 8 > size:
                    self._need(offs, 8, f"the length of string {i} of {n}")
                (slen,) = length(buf, offs)
                offs += 8
                if slen > size - offs:
                    self._need(offs, slen, f"string {i} of {n} ({slen} bytes)")
                append(str(buf[offs : offs + slen], "utf-8", "replace"))
                offs += slen
            return out, offs

        def _get_field_parts(self, orig_offs, raw_type):
            vtype = self._value_type(raw_type)
            if vtype == GGUFValueType.STRING:
                slen, data = self._get_str(orig_offs)
                return 8 + len(data), [slen, data], [1], [vtype]
            scalar = self.gguf_scalar_to_np.get(vtype)
            if scalar is not None:
                size = np.dtype(scalar).itemsize
                self._need(orig_offs, size, f"a {vtype.name} value")
                return size, [self._get(orig_offs, scalar)], [0], [vtype]
            # an array: element type, element count, the elements
            self._need(orig_offs, 12, "an array header")
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, n, offs = self._value_type(raw_itype[0], "array element type"), int(alen[0]), orig_offs + 12
            if itype == GGUFValueType.ARRAY:
                raise _Corrupt("is an array of arrays, which GGUF readers do not support (llama.cpp refuses it too)")
            if itype == GGUFValueType.STRING:
                strings, end = self._strings(offs, n)
                return end - orig_offs, [raw_itype, alen, strings], [2], [vtype, itype]
            scalar = self.gguf_scalar_to_np[itype]
            size = np.dtype(scalar).itemsize
            self._fits(n, offs, size, f"array length (of {itype.name})")
            return 12 + n * size, [raw_itype, alen, self._get(offs, scalar, n)], [2], [vtype, itype]

        def _build_fields(self, offs, count):
            count = int(count)
            self._fits(count, offs, _MIN_KV_BYTES, "GGUF header metadata key count")
            for i in range(count):
                orig_offs = offs
                try:
                    kv_klen, kv_kdata = self._get_str(offs)
                except _Corrupt as exc:
                    raise _Corrupt(f"GGUF metadata key {i}: {exc}") from None
                key = bytes(kv_kdata).decode("utf-8", errors="replace")
                if key in self.fields:
                    raise _Corrupt(f"duplicate GGUF metadata key {_q(key)} (llama.cpp refuses such a file too)")
                offs += 8 + len(kv_kdata)
                try:
                    self._need(offs, 4, "the value type")
                    raw_kv_type = self._get(offs, np.uint32)
                    size, parts, idxs, types = self._get_field_parts(offs + 4, raw_kv_type[0])
                except _Corrupt as exc:
                    raise _Corrupt(f"GGUF metadata key {_q(key)}: {exc}") from None
                self._push_field(_gguf.ReaderField(orig_offs, key, [kv_klen, kv_kdata, raw_kv_type, *parts],
                                                   [3 + j for j in idxs], types), skip_sum=True)
                offs += 4 + size
            return offs

        def _check_alignment(self) -> None:
            field = self.fields.get("general.alignment")
            if field is None:
                return
            if field.types != [GGUFValueType.UINT32]:
                kind = "/".join(t.name for t in field.types)
                raise _Corrupt(f"GGUF metadata key 'general.alignment' should be a UINT32, got {kind}")
            alignment = int(field.parts[-1][0])
            if alignment == 0 or alignment & (alignment - 1):
                raise _Corrupt(f"GGUF metadata key 'general.alignment' = {alignment} is not a power of two")

        def _build_tensor_info(self, offs, count):
            self._check_alignment()  # stock __init__ checks it next, in fewer words
            count = int(count)
            self._fits(count, offs, _MIN_TENSOR_INFO_BYTES, "GGUF header tensor count")
            infos = []
            for i in range(count):
                try:
                    _name_len, name_data = self._get_str(offs)
                except _Corrupt as exc:
                    raise _Corrupt(f"tensor {i}: name: {exc}") from None
                name = bytes(name_data).decode("utf-8", errors="replace")
                offs += 8 + len(name_data)
                try:
                    self._need(offs, 4, "the dimension count")
                    n_dims = int(self._get(offs, np.uint32)[0])
                    if n_dims > GGML_MAX_DIMS:
                        raise _Corrupt(f"has {n_dims} dimensions; a GGUF tensor has at most {GGML_MAX_DIMS}")
                    self._need(offs + 4, 8 * n_dims + 12, f"{n_dims} dimensions, the type and the offset")
                    ne = tuple(int(d) for d in self._get(offs + 4, np.uint64, n_dims))
                    for j, d in enumerate(ne):
                        if d >= 1 << 63:
                            raise _Corrupt(f"dimension {j} is {d}, negative ({d - (1 << 64)}) as the int64 ggml reads")
                    offs += 4 + 8 * n_dims
                    type_id, rel = int(self._get(offs, np.uint32)[0]), int(self._get(offs + 4, np.uint64)[0])
                except _Corrupt as exc:
                    raise _Corrupt(f"tensor {_q(name)}: {exc}") from None
                infos.append((name, ne, type_id, rel))
                offs += 12
            return offs, infos

        def _build_tensors(self, start_offs, fields):
            self._raw_tensors = [(name, ne, type_id, int(start_offs) + rel) for name, ne, type_id, rel in fields]
            self.tensors = []


# --------------------------------------------------------------------------- metadata


def _field_value(field: Any) -> Any:
    """A ReaderField as plain Python: str, int, float, bool, or a list of those."""
    types = field.types
    if not types:
        return None
    main = types[0]
    parts = field.parts
    if main == GGUFValueType.STRING:
        return bytes(parts[field.data[0]]).decode("utf-8", errors="replace")
    if main != GGUFValueType.ARRAY:
        return parts[field.data[0]].tolist()[0]
    # _Reader keeps an array's elements in one part: a list of str, or one numpy view of all the numbers
    # (nested arrays are refused while reading)
    values = parts[field.data[0]]
    return values if isinstance(values, list) else values.tolist()


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int
    type_name: str  # ggml name, e.g. "Q4_1"; "UNKNOWN_<id>" for an id gguf does not know
    shape: tuple[int, ...]  # numpy order: reversed ggml ne, last axis = ne[0]
    n_elements: int
    n_bytes: int | None  # None when the type is unknown
    offset: int  # absolute byte offset in the file
    block_size: int | None
    type_size: int | None


class GGUFFile:
    """A GGUF file opened for reading. Use `GGUFFile.open(path)`."""

    def __init__(self, path: str, reader: Any, metadata: dict[str, Any], infos: dict[str, GGUFTensorInfo],
                 version: int, alignment: int, data_offset: int, file_size: int):
        self.path = path
        self.metadata = metadata
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.file_size = file_size
        self._reader = reader
        self._infos = infos
        self._plain = reader._plain if reader is not None else None
        self._swapped = reader is not None and reader.byte_order == "S"

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "GGUFFile":
        path = os.fspath(path)
        if _gguf is None:  # pragma: no cover
            raise ModelLoadError(f"{path}: cannot read GGUF: the 'gguf' package is not installed ({_GGUF_IMPORT_ERROR})")
        if not os.path.exists(path):
            raise ModelLoadError(f"{path}: GGUF file not found")
        if os.path.isdir(path):
            raise ModelLoadError(f"{path}: is a directory, not a GGUF file")
        if not os.path.isfile(path):  # a FIFO would block the read below forever; a device has no size
            raise ModelLoadError(f"{path}: not a regular file (a pipe or a device?), not a GGUF file")
        try:
            file_size = os.path.getsize(path)
            with open(path, "rb") as fh:
                head = fh.read(8)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read file: {_one_line(exc.strerror or exc)}") from None
        if head[:4] != GGUF_MAGIC:
            if len(head) < 4:
                raise ModelLoadError(f"{path}: not a GGUF file (only {len(head)} bytes, no GGUF magic)")
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
        if file_size < 24:
            raise ModelLoadError(f"{path}: truncated GGUF file: {file_size} bytes, the header alone needs 24")
        try:
            reader = _Reader(path, "r")
        except _Corrupt as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        except Exception as exc:  # gguf raises ValueError/IndexError/KeyError/OverflowError on corrupt headers
            detail = _one_line(f"{type(exc).__name__}: {exc}")
            if "version" in str(exc):
                raise ModelLoadError(f"{path}: unsupported GGUF version ({detail})") from None
            raise ModelLoadError(f"{path}: truncated or corrupt GGUF header ({detail})") from None

        try:
            metadata = {}
            for key, field in reader.fields.items():
                if key.startswith("GGUF."):
                    continue
                metadata[key] = _field_value(field)
            version = int(reader.fields["GGUF.version"].parts[0][0])
        except Exception as exc:
            raise ModelLoadError(f"{path}: corrupt GGUF metadata ({_one_line(exc)})") from None
        # Nothing reads the reader's fields after this (the metadata holds the plain values).
        reader.fields = {}

        infos: dict[str, GGUFTensorInfo] = {}
        alignment, data_offset = int(reader.alignment), int(reader.data_offset)
        for name, ne, type_id, offset in reader._raw_tensors:
            if name in infos:
                raise ModelLoadError(f"{path}: duplicate tensor {_q(name)}")
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                qtype = None
            n_elements = math.prod(ne)  # Python ints: a product that overflows int64 is seen, not wrapped
            if n_elements >= 1 << 63:
                raise ModelLoadError(f"{path}: tensor {_q(name)} has dimensions {list(ne)}: {n_elements} elements, "
                                     f"more than the int64 ggml counts in")
            if (offset - data_offset) % alignment:
                raise ModelLoadError(f"{path}: tensor {_q(name)} data at offset {offset - data_offset} is not a "
                                     f"multiple of the file's alignment {alignment}")
            if qtype is None:
                type_name, block, tsize, n_bytes = f"UNKNOWN_{type_id}", None, None, None
            else:
                type_name = qtype.name
                block, tsize = GGML_QUANT_SIZES[qtype]
                if ne and ne[0] % block != 0:
                    raise ModelLoadError(
                        f"{path}: tensor {_q(name)} of type {type_name} has row length {ne[0]}, "
                        f"not a multiple of its block size {block}")
                n_bytes = n_elements // block * tsize
                if offset + n_bytes > file_size:
                    raise ModelLoadError(
                        f"{path}: truncated GGUF file: tensor {_q(name)} ({type_name}, {n_bytes} bytes at offset "
                        f"{offset}) ends at byte {offset + n_bytes}, but the file has only {file_size} bytes")
            infos[name] = GGUFTensorInfo(
                name=name, type_id=type_id, type_name=type_name, shape=tuple(reversed(ne)),
                n_elements=n_elements, n_bytes=n_bytes, offset=offset, block_size=block, type_size=tsize)
        placed = sorted((i for i in infos.values() if i.n_bytes), key=lambda i: i.offset)
        for prev, this in zip(placed, placed[1:]):
            if this.offset < prev.offset + prev.n_bytes:
                raise ModelLoadError(f"{path}: tensors {_q(prev.name)} (bytes {prev.offset} to "
                                     f"{prev.offset + prev.n_bytes}) and {_q(this.name)} (from byte {this.offset}) overlap")

        return cls(path, reader, metadata, infos, version, alignment, data_offset, file_size)

    def close(self) -> None:
        """Let go of the memory map. Arrays from `tensor()` are copies and stay valid; views from `raw()`
        keep the mapping alive for as long as they live."""
        self._reader = None
        self._plain = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, architecture={self.metadata.get('general.architecture')!r}, tensors={len(self._infos)})"

    # ------------------------------------------------------------------ metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """The value of a metadata key the model cannot do without; ModelLoadError naming the key if absent
        (or, with `kind`, of the wrong type)."""
        if key not in self.metadata:
            raise ModelLoadError(f"{self.path}: missing required GGUF metadata key {key!r}")
        value = self.metadata[key]
        if kind is not None:
            ok = isinstance(value, kind)
            if ok and isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
                ok = False  # a bool is an int to Python, not to a model config
            if not ok:
                want = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ModelLoadError(
                    f"{self.path}: GGUF metadata key {key!r} should be {want}, got {type(value).__name__} {value!r:.60}")
        return value

    @property
    def architecture(self) -> str:
        return self.require("general.architecture", str)

    # ------------------------------------------------------------------ tensors

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: missing tensor {_q(name)}") from None

    def tensor_info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(ggml type name, numpy shape), e.g. ("Q4_1", (576, 576))."""
        info = self.info(name)
        return info.type_name, info.shape

    def _check_open(self) -> np.ndarray:
        if self._plain is None:
            raise ModelLoadError(f"{self.path}: GGUF file is closed")
        return self._plain

    def release_pages(self) -> None:
        """Tell the kernel our process no longer needs the mapped pages resident (MADV_DONTNEED).

        The mapping is read-only, so nothing is lost: a later `raw()`/`tensor()` reads the pages back
        from the page cache. A loader that copied every tensor out calls this, so the file's pages stop
        counting in the worker's resident memory."""
        mm = getattr(getattr(self._reader, "data", None), "_mmap", None)
        advice = getattr(__import__("mmap"), "MADV_DONTNEED", None)
        if mm is not None and advice is not None:
            try:
                mm.madvise(advice)
            except (OSError, ValueError):  # pragma: no cover - advisory only
                pass

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored: a read-only, memory-mapped uint8 array shaped
        `shape[:-1] + (ne0 // block_size * type_size,)` - one row of quantized blocks per row."""
        info = self.info(name)
        if info.n_bytes is None:
            raise ModelLoadError(
                f"{self.path}: tensor {_q(name)} has unsupported ggml type id {info.type_id} (unknown to gguf {gguf_version()})")
        plain = self._check_open()
        data = plain[info.offset : info.offset + info.n_bytes]
        row_bytes = info.shape[-1] // info.block_size * info.type_size if info.shape else info.n_bytes
        return data.reshape(tuple(info.shape[:-1]) + (row_bytes,))

    def tensor(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """The tensor dequantized, as a fresh C-contiguous array of `dtype` in numpy order
        (last axis = ggml ne[0]); ModelLoadError naming the tensor for a type we cannot decode."""
        info = self.info(name)
        tname = info.type_name
        if info.n_bytes is None:
            raise ModelLoadError(
                f"{self.path}: tensor {_q(name)} has unsupported ggml type id {info.type_id} (unknown to gguf {gguf_version()})")
        if tname not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{self.path}: tensor {_q(name)} has unsupported type {tname} (cannot dequantize; "
                f"supported: {', '.join(sorted(SUPPORTED_TYPES))})")
        raw = self.raw(name)
        if tname in _PLAIN_TYPES:
            st = _PLAIN_TYPES[tname].newbyteorder("S" if self._swapped else "=")
            values = raw.view(st).reshape(info.shape)
            return np.array(values, dtype=dtype, order="C", copy=True)
        if self._swapped:
            raise ModelLoadError(
                f"{self.path}: tensor {_q(name)}: {tname} in a big-endian GGUF is not supported")
        try:
            values = _gguf_quants.dequantize(raw, GGMLQuantizationType(info.type_id))
        except NotImplementedError:
            raise ModelLoadError(f"{self.path}: tensor {_q(name)} has unsupported type {tname} (cannot dequantize)") from None
        out = np.ascontiguousarray(values.reshape(info.shape), dtype=dtype)
        if not out.flags.writeable or np.may_share_memory(out, raw):
            out = out.copy()
        return out

    def tensors(self, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
        """(name, dequantized array) for every tensor, in file order."""
        for name in self._infos:
            yield name, self.tensor(name, dtype)

