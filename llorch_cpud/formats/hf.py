"""Hugging Face model folders: config.json + model.safetensors (or a sharded index), into numpy float32.

Pickle checkpoints (pytorch_model.bin) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from llorch_cpud import kernels
from llorch_cpud.errors import ModelLoadError
from llorch_cpud.models.base import NameTable, build_weights, expand_names
from llorch_cpud.models.gpt2 import GPT2, GPT2Block, GPT2Config, GPT2Weights
from llorch_cpud.tokenizer import load_hf_tokenizer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a Hugging Face model folder needs config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, single or sharded; refuses pickle-only folders."""
    single = folder / SAFETENSORS
    index = folder / SAFETENSORS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, RecursionError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ModelLoadError(f"{index}: not a valid safetensors index ({type(e).__name__}: {str(e)[:200]})") from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: 'weight_map' should be a non-empty object mapping tensor names to shard "
                                 f"files, got {type(weight_map).__name__}")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                raise ModelLoadError(f"{index}: 'weight_map' gives tensor {name!r:.80} the shard {shard!r:.80}, "
                                     "not a file name in this folder")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: shard listed in {index.name} is missing")
        return files
    for name in PICKLE_FILES:
        if (folder / name).is_file():
            raise ModelLoadError(
                f"{folder / name}: pickle checkpoints are refused (unpickling can run arbitrary code); "
                "convert it to model.safetensors"
            )
    raise ModelLoadError(f"{folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX} found")


CHUNK_BYTES = 4 << 20

#: dtype -> bytes per element, for the dtypes `read_tensor` can convert to float32 (numpy has no bfloat16/float8).
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                      "U16": 2, "U8": 1, "BOOL": 1}
#: The most header this loader reads (the format allows 100 MB): a GPT-2 of 1024 layers, the most GPT2Config takes,
#: has ~14k tensors, ~1.5 MB of header; 8 MiB keeps a hostile header's parsed JSON to ~100 MB of Python objects.
MAX_HEADER_BYTES = 8 << 20
#: Tensors read per opening of a file (`load_safetensors`): each opening parses the whole header again.
OPEN_BYTES = 64 << 20


def safetensors_header(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (begin, end) in the data} of a .safetensors file, in header order, once its header is checked
    the way the format requires - a JSON object of entries whose dtype, shape and data_offsets agree, stored back to
    back over the whole data - with a one-line ModelLoadError naming the file and the tensor otherwise. Every number
    is checked against the file's size before anything is read for it."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: not a safetensors file ({size} bytes; its header length alone needs 8)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelLoadError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes): "
                                 "truncated or corrupt")
        if n > MAX_HEADER_BYTES:
            raise ModelLoadError(f"{path}: safetensors header of {n} bytes is more than the {MAX_HEADER_BYTES} this "
                                 "loader reads")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ModelLoadError(f"{path}: safetensors header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: safetensors header should be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - n
    out: dict[str, tuple[int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ModelLoadError(f"{path}: safetensors header '__metadata__' should map strings to strings")
            continue
        where = f"{path}: tensor {name!r:.80}"
        if not isinstance(info, dict):
            raise ModelLoadError(f"{where}: header entry should be an object, got {type(info).__name__}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{where}: dtype {dtype!r:.40} unsupported (this loader reads "
                                 f"{', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ModelLoadError(f"{where}: shape {shape!r:.80} should be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ModelLoadError(f"{where}: data_offsets {offsets!r:.80} should be [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ModelLoadError(f"{where}: data_offsets [{begin}, {end}] are reversed or negative")
        if end > data_size:
            raise ModelLoadError(f"{where}: data_offsets [{begin}, {end}] run past the end of the data "
                                 f"({data_size} bytes): truncated or corrupt file")
        n_bytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]  # Python ints: no overflow
        if n_bytes != end - begin:
            raise ModelLoadError(f"{where}: shape {shape} of {dtype} is {n_bytes} bytes, but data_offsets [{begin}, "
                                 f"{end}] hold {end - begin}")
        out[name] = (begin, end)
    placed = sorted(out.items(), key=lambda kv: kv[1])
    for (prev, (_, prev_end)), (name, (begin, end)) in zip(placed, placed[1:]):
        if begin < prev_end:
            raise ModelLoadError(f"{path}: tensor {name!r:.80}: data_offsets [{begin}, {end}] overlap the data of "
                                 f"tensor {prev!r:.80} (which ends at {prev_end})")
    at, prev = 0, None
    for name, (begin, end) in placed:
        if begin != at:
            raise ModelLoadError(f"{path}: tensor {name!r:.80}: data_offsets [{begin}, {end}] leave bytes {at} to "
                                 f"{begin} of the data unused (safetensors stores tensors back to back)")
        at, prev = end, name
    if at != data_size:
        raise ModelLoadError(f"{path}: {data_size - at} bytes after the last tensor's data (tensor {prev!r:.80}): "
                             "corrupt safetensors file")
    return out


def read_tensor(st, name: str) -> np.ndarray:
    """One tensor as contiguous float32, read in row chunks of ~4 MB.

    Reading a large tensor in one call holds the GIL for tens of milliseconds; in chunks, a
    server loading its model keeps answering /health promptly."""
    sl = st.get_slice(name)
    shape = tuple(sl.get_shape())
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 4 if len(shape) > 1 else 0
    if len(shape) < 2 or shape[0] * row_bytes <= CHUNK_BYTES:
        return np.ascontiguousarray(st.get_tensor(name), dtype=np.float32)
    out = np.empty(shape, dtype=np.float32)
    step = max(1, CHUNK_BYTES // row_bytes)
    for r in range(0, shape[0], step):
        end = min(r + step, shape[0])
        out[r:end] = sl[r:end]
    return out


def load_safetensors(files: list[Path], strip_prefixes: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """All tensors of the given files as contiguous float32 numpy arrays, keyed by checkpoint name."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    for f in files:
        groups: list[list[str]] = [[]]
        size = 0
        for name, (begin, end) in safetensors_header(f).items():
            if groups[-1] and size + end - begin > OPEN_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += end - begin
        # the file is opened (memory-mapped) per group of tensors of at most OPEN_BYTES (or one larger tensor):
        # closing it unmaps the pages just read, so the process never holds the whole file's mapping on top of the
        # copies, and a file of many tiny tensors is not opened (its header parsed) once per tensor
        for group in groups:
            try:
                with safe_open(str(f), framework="numpy") as st:
                    for name in group:
                        key = name
                        for p in strip_prefixes:
                            if key.startswith(p):
                                key = key[len(p) :]
                        try:
                            out[key] = read_tensor(st, name)
                        except (SafetensorError, ValueError, TypeError, AttributeError) as e:
                            raise ModelLoadError(f"{f}: tensor {name!r:.80}: cannot read ({e})") from None
            except (SafetensorError, OSError, ValueError, TypeError) as e:
                raise ModelLoadError(f"{f}: cannot read safetensors ({e})") from None
    return out


# ---------------------------------------------------------------- GPT-2

#: GPT-2's checkpoint tensors (Hugging Face names, "transformer." stripped) -> GPT2Weights / GPT2Block fields.
GPT2_NAMES: NameTable = {
    "wte.weight": "wte_weight",
    "wpe.weight": "wpe_weight",
    "ln_f.weight": "ln_f_weight",
    "ln_f.bias": "ln_f_bias",
    "h.{i}.ln_1.weight": "ln_1_weight",
    "h.{i}.ln_1.bias": "ln_1_bias",
    "h.{i}.attn.c_attn.weight": "attn_c_attn_weight",
    "h.{i}.attn.c_attn.bias": "attn_c_attn_bias",
    "h.{i}.attn.c_proj.weight": "attn_c_proj_weight",
    "h.{i}.attn.c_proj.bias": "attn_c_proj_bias",
    "h.{i}.ln_2.weight": "ln_2_weight",
    "h.{i}.ln_2.bias": "ln_2_bias",
    "h.{i}.mlp.c_fc.weight": "mlp_c_fc_weight",
    "h.{i}.mlp.c_fc.bias": "mlp_c_fc_bias",
    "h.{i}.mlp.c_proj.weight": "mlp_c_proj_weight",
    "h.{i}.mlp.c_proj.bias": "mlp_c_proj_bias",
}
#: The Conv1D matrices ([in, out]): packed as Wᵀ for the C kernels.
CONV1D_FIELDS = ("attn_c_attn_weight", "attn_c_proj_weight", "mlp_c_fc_weight", "mlp_c_proj_weight")

OPTIONAL_FIELDS = ("n_inner", "bos_token_id", "eos_token_id")
CONFIG_RULES = {  # field -> (type, low, high): bounds far beyond any GPT-2, far below a runaway allocation
    "vocab_size": (int, 1, 1 << 22),
    "n_positions": (int, 1, 1 << 20),
    "n_embd": (int, 1, 1 << 16),
    "n_layer": (int, 1, 1024),
    "n_head": (int, 1, 1 << 12),
    "n_inner": (int, 1, 1 << 18),
    "layer_norm_epsilon": ((int, float), 0.0, 1.0),
    "activation_function": (str, None, None),
    "scale_attn_weights": (bool, None, None),
    "bos_token_id": (int, 0, 1 << 22),
    "eos_token_id": (int, 0, 1 << 22),
}
#: Fields this model does not read but other GPT-2 code does (n_ctx: the legacy name of the context length):
#: checked the same way, so a config that is absurd to them is refused here too.
CHECKED_ONLY = {"n_ctx": (int, 1, 1 << 20)}


def gpt2_config(d: dict, source: str = "config.json") -> GPT2Config:
    """The fields GPT2Config reads from a Hugging Face config, each checked for its type and a sane range
    (ModelLoadError naming `source` and the field): an absurd value fails here, before anything is allocated."""
    known = set(GPT2Config.__dataclass_fields__)
    values = {k: v for k, v in d.items() if k in known}
    for name, value in {**values, **{k: d[k] for k in CHECKED_ONLY if k in d}}.items():
        kind, lo, hi = CONFIG_RULES.get(name) or CHECKED_ONLY[name]
        if value is None and name in OPTIONAL_FIELDS:
            continue
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if ok and lo is not None:
            ok = lo <= value <= hi if kind is int else lo < value < hi  # (a NaN fails)
        if not ok:
            rule = {int: f"an integer in [{lo}, {hi}]", float: f"a number in ({lo}, {hi})", bool: "true or false",
                    str: "a string"}[kind if kind in (int, bool, str) else float]
            raise ModelLoadError(f"{source}: {name} must be {rule}, got {value!r:.80}")
    return GPT2Config(**values)


def load_gpt2_folder(folder: Path, tokenizer=None, decode_path: str | None = None, numerics: str = "float32"):
    """A GPT2 model and its tokenizer from a Hugging Face folder (`tokenizer`: one already built from it);
    `decode_path` (models.base.PATHS; None: the best this build has) - "numpy" keeps numpy arrays."""
    raw = read_config(folder)
    cfg = gpt2_config(raw, source=str(folder / "config.json"))
    if cfg.activation_function != "gelu_new":
        raise ModelLoadError(f"{folder / 'config.json'}: activation_function {cfg.activation_function!r} unsupported (GPT-2 uses gelu_new)")
    if cfg.n_embd % cfg.n_head:
        raise ModelLoadError(f"{folder / 'config.json'}: n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    if numerics != "float32":
        raise ModelLoadError(f"{folder}: --numerics {numerics} needs weights held quantized by the C kernels "
                             "(GGUF Q4_0/Q4_1/Q5_0/Q8_0); this model has none")
    tensors = load_safetensors(weight_files(folder), strip_prefixes=("transformer.",))
    expected = gpt2_weight_shapes(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelLoadError(f"{folder}: tensor {name!r} missing from the safetensors files")
        if tensors[name].shape != shape:
            raise ModelLoadError(f"{folder}: tensor {name!r} has shape {tensors[name].shape}, config says {shape}")
    names = expand_names(GPT2_NAMES, cfg.n_layer)  # buffers like h.0.attn.bias and an untied lm_head copy: not read
    weights = build_weights(names, tensors, GPT2Weights, GPT2Block, cfg.n_layer)
    packed = kernels.enabled() and decode_path != "numpy"
    for blk in weights.blocks:
        for field in CONV1D_FIELDS:
            w = getattr(blk, field)
            if packed:  # Conv1D [in, out] = Wᵀ: packed as W [out, in] for the C kernel (models/gpt2.conv1d)
                setattr(blk, field, kernels.PackedMatrix.from_dense(w.T))
            else:
                # Same [in, out] tensor, stored column-major: `x @ W` then reads W as contiguous rows of
                # dot products (BLAS "T" matvec), which streams memory faster than the axpy form.
                setattr(blk, field, np.asfortranarray(w))
    if packed:  # the tied head [vocab, n_embd] (also the embedding: rows are looked up in the packed form)
        weights.wte_weight = kernels.PackedMatrix.from_dense(weights.wte_weight)
    if tokenizer is None:
        tokenizer = load_hf_tokenizer(folder, eos_token_id=cfg.eos_token_id)
    return GPT2(cfg, weights, names, path=decode_path), tokenizer


def gpt2_weight_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 checkpoint must hold, with its shape (Conv1D weights are [in, out])."""
    d, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    per_block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                 "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                 "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, d),
                 "mlp.c_proj.bias": (d,)}
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.n_positions, d),
                                          "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.n_layer):
        shapes.update({f"h.{i}.{name}": shape for name, shape in per_block.items()})
    return shapes
