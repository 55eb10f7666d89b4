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
  type and a missing metadata key - never a traceback from gguf internals.

Usage:

    f = GGUFFile.open("model.gguf")
    f.architecture                      # "llama"
    f.require("llama.block_count")     # 30, or ModelLoadError naming the key
    w = f.tensor("blk.0.attn_q.weight")  # float32 [576, 576]
"""

from __future__ import annotations

import os
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

        def _build_tensors(self, start_offs, fields):
            raw = []
            for field in fields:
                _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                ne = tuple(int(d) for d in dims.tolist())
                raw.append((name, ne, int(raw_dtype[0]), int(start_offs) + int(offset_tensor[0])))
            self._raw_tensors = raw
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
    if len(types) > 2 and types[1] == GGUFValueType.ARRAY:  # nested arrays: rare; trust gguf's own decoder
        return field.contents()
    if not field.data:
        return []
    sub = types[-1]
    if sub == GGUFValueType.STRING:
        return [bytes(parts[i]).decode("utf-8", errors="replace") for i in field.data]
    first = field.data[0]
    # Elements of a numeric array are stored back to back, so the parts are consecutive
    # one-element views; concatenating them is one C call instead of a Python loop.
    return np.concatenate(parts[first : first + len(field.data)]).tolist()


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
        # The reader's fields are ~10^5 small numpy views (one per vocabulary string, ...): tens of
        # MB of objects once `metadata` holds the plain values. Nothing reads them after this.
        reader.fields = {}

        infos: dict[str, GGUFTensorInfo] = {}
        for name, ne, type_id, offset in reader._raw_tensors:
            if name in infos:
                raise ModelLoadError(f"{path}: duplicate tensor {name!r}")
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                qtype = None
            n_elements = int(np.prod(ne, dtype=np.int64)) if ne else 1
            if qtype is None:
                type_name, block, tsize, n_bytes = f"UNKNOWN_{type_id}", None, None, None
            else:
                type_name = qtype.name
                block, tsize = GGML_QUANT_SIZES[qtype]
                if ne and ne[0] % block != 0:
                    raise ModelLoadError(
                        f"{path}: tensor {name!r} of type {type_name} has row length {ne[0]}, "
                        f"not a multiple of its block size {block}")
                n_bytes = n_elements // block * tsize
                if offset + n_bytes > file_size:
                    raise ModelLoadError(
                        f"{path}: truncated GGUF file: tensor {name!r} ({type_name}, {n_bytes} bytes at offset "
                        f"{offset}) ends at byte {offset + n_bytes}, but the file has only {file_size} bytes")
            infos[name] = GGUFTensorInfo(
                name=name, type_id=type_id, type_name=type_name, shape=tuple(reversed(ne)),
                n_elements=n_elements, n_bytes=n_bytes, offset=offset, block_size=block, type_size=tsize)

        return cls(path, reader, metadata, infos, version, int(reader.alignment), int(reader.data_offset), file_size)

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
            raise ModelLoadError(f"{self.path}: missing tensor {name!r}") from None

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
                f"{self.path}: tensor {name!r} has unsupported ggml type id {info.type_id} (unknown to gguf {gguf_version()})")
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
                f"{self.path}: tensor {name!r} has unsupported ggml type id {info.type_id} (unknown to gguf {gguf_version()})")
        if tname not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has unsupported type {tname} (cannot dequantize; "
                f"supported: {', '.join(sorted(SUPPORTED_TYPES))})")
        raw = self.raw(name)
        if tname in _PLAIN_TYPES:
            st = _PLAIN_TYPES[tname].newbyteorder("S" if self._swapped else "=")
            values = raw.view(st).reshape(info.shape)
            return np.array(values, dtype=dtype, order="C", copy=True)
        if self._swapped:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r}: {tname} in a big-endian GGUF is not supported")
        try:
            values = _gguf_quants.dequantize(raw, GGMLQuantizationType(info.type_id))
        except NotImplementedError:
            raise ModelLoadError(f"{self.path}: tensor {name!r} has unsupported type {tname} (cannot dequantize)") from None
        out = np.ascontiguousarray(values.reshape(info.shape), dtype=dtype)
        if not out.flags.writeable or np.may_share_memory(out, raw):
            out = out.copy()
        return out

    def tensors(self, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
        """(name, dequantized array) for every tensor, in file order."""
        for name in self._infos:
            yield name, self.tensor(name, dtype)

