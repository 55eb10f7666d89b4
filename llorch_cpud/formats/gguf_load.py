"""A .gguf file as a model and its tokenizer: the GGUF name table, the config from the metadata, and the weights
held as the kernels need them (formats/gguf.py reads the file; models/llama.py computes).

Kept apart from the reader, which the tokenizer-only users (bench's peer runners, scripts) import without
the model code and the C kernels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llorch_cpud import kernels
from llorch_cpud.errors import ModelLoadError
from llorch_cpud.formats.gguf import GGUFFile
from llorch_cpud.kernels import PackedMatrix, QuantMatrix
from llorch_cpud.kernels.quantized import NUMERICS, set_numerics
from llorch_cpud.models.base import NameTable, build_weights, expand_names, weight_values
from llorch_cpud.models.llama import Llama, LlamaBlock, LlamaConfig, LlamaWeights, RopeTables
from llorch_cpud.tokenizer import Tokenizer
from llorch_cpud.tokenizer.gguf import load_gguf_tokenizer

#: `general.architecture` values this loader runs (same tensors, same math as Llama).
SUPPORTED_ARCHITECTURES = ("llama",)

#: The GGUF tensors of the Llama architecture -> LlamaWeights / LlamaBlock fields.
LLAMA_NAMES: NameTable = {
    "token_embd.weight": "token_embd_weight",
    "output_norm.weight": "output_norm_weight",
    "output.weight": "output_weight",  # optional: absent when the head is tied to token_embd
    "rope_freqs.weight": "rope_freqs_weight",  # optional: llama.cpp's per-frequency rope divisors
    "blk.{i}.attn_norm.weight": "attn_norm_weight",
    "blk.{i}.attn_q.weight": "attn_q_weight",
    "blk.{i}.attn_k.weight": "attn_k_weight",
    "blk.{i}.attn_v.weight": "attn_v_weight",
    "blk.{i}.attn_output.weight": "attn_output_weight",
    "blk.{i}.ffn_norm.weight": "ffn_norm_weight",
    "blk.{i}.ffn_gate.weight": "ffn_gate_weight",
    "blk.{i}.ffn_up.weight": "ffn_up_weight",
    "blk.{i}.ffn_down.weight": "ffn_down_weight",
}
_OPTIONAL = ("output.weight", "rope_freqs.weight")
#: Block matrices that share their input: held as one fused matrix, each a view of it (one kernel call).
FUSED = (("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
         ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"))


def llama_config(f) -> LlamaConfig:
    """A LlamaConfig from a GGUFFile's metadata; ModelLoadError naming the key at fault."""
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{f.path}: unsupported model architecture general.architecture = {arch!r:.60} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    a = arch + "."

    def integer(key: str, lo: int, hi: int, default: int | None = None) -> int:
        value = f.require(a + key) if default is None else f.get(a + key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ModelLoadError(f"{f.path}: GGUF metadata key {a + key!r} should be an integer in [{lo}, {hi}], "
                                 f"got {value!r:.60}")
        return value

    def number(key: str, default: float | None = None, above: float = 0.0, below: float = math.inf) -> float:
        value = f.require(a + key) if default is None else f.get(a + key, default)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not above < value < below):
            rule = f"a finite number above {above:g}" + (f" and below {below:g}" if below < math.inf else "")
            raise ModelLoadError(f"{f.path}: GGUF metadata key {a + key!r} should be {rule}, got {value!r:.60}")
        return float(value)

    # Bounds far beyond any Llama-family model (405B: 126 blocks, 16384 wide, 128 heads, 53248 FFN; 10M
    # context), far below what would make the checks and tables built from them a runaway allocation.
    n_layer = integer("block_count", 1, 1024)
    n_embd = integer("embedding_length", 1, 1 << 16)
    n_head = integer("attention.head_count", 1, 1 << 12)
    n_kv_head = integer("attention.head_count_kv", 1, 1 << 12, n_head)
    if n_head % n_kv_head:
        raise ModelLoadError(f"{f.path}: GGUF metadata key {a + 'attention.head_count_kv'!r} = {n_kv_head} does "
                             f"not divide {a + 'attention.head_count'!r} = {n_head}")
    if a + "attention.key_length" not in f.metadata and n_embd % n_head:
        raise ModelLoadError(f"{f.path}: GGUF metadata key {a + 'embedding_length'!r} = {n_embd} is not divisible "
                             f"by {a + 'attention.head_count'!r} = {n_head} (and no {a + 'attention.key_length'!r} "
                             f"gives the head size)")
    head_dim = integer("attention.key_length", 1, 1 << 12, n_embd // n_head)
    if integer("attention.value_length", 1, 1 << 12, head_dim) != head_dim:
        raise ModelLoadError(f"{f.path}: {a}attention.value_length differs from key_length (unsupported)")
    if head_dim % 2:
        raise ModelLoadError(f"{f.path}: head_dim {head_dim} is odd; rotary embedding needs an even one")
    rope_dim = integer("rope.dimension_count", 1, 1 << 12, head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(f"{f.path}: {a}rope.dimension_count = {rope_dim} (partial rotary) "
                             f"is unsupported; head_dim is {head_dim}")
    scaling = f.get(a + "rope.scaling.type") or "none"
    if scaling not in ("none", "linear"):
        raise ModelLoadError(f"{f.path}: {a}rope.scaling.type = {scaling!r:.60} is unsupported (none, linear are)")
    factor = number("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
    if f.get(a + "expert_count", 0):
        raise ModelLoadError(f"{f.path}: {a}expert_count = {f.get(a + 'expert_count')!r:.60}: mixture-of-experts "
                             f"Llama models are unsupported")
    embd = f.info("token_embd.weight")  # its rows are the vocabulary the model has
    if len(embd.shape) != 2 or not 1 <= embd.shape[0] <= 1 << 22:
        raise ModelLoadError(f"{f.path}: tensor 'token_embd.weight' has shape {embd.shape}, expected "
                             f"[vocabulary (1 to {1 << 22}), {a}embedding_length]")
    vocab = embd.shape[0]
    return LlamaConfig(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=n_kv_head,
        n_ff=integer("feed_forward_length", 1, 1 << 18),
        vocab_size=vocab,
        n_ctx=integer("context_length", 1, 1 << 24, 2048),
        head_dim=head_dim,
        rope_base=number("rope.freq_base", 10000.0),
        rope_linear_factor=factor,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", below=1.0),
        tied_embeddings="output.weight" not in f,
        architecture=arch,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
    )


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's rotary-permuted Q/K rows back into the HF layout.

    llama.cpp's converter writes W_gguf = W_hf.reshape(h, 2, d/2, in).swapaxes(1, 2); its inverse,
    as transformers applies it, is W_hf = W_gguf.reshape(h, d/2, 2, in).swapaxes(1, 2), i.e.
    W_hf = W_gguf[order] with the order below."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)  # [n_rows]


def _expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every LLAMA_NAMES tensor's shape from the metadata (block names with "{i}")."""
    hd, e = c.head_dim, c.n_embd
    return {
        "token_embd.weight": (c.vocab_size, e), "output_norm.weight": (e,), "output.weight": (c.vocab_size, e),
        "rope_freqs.weight": (hd // 2,),
        "blk.{i}.attn_norm.weight": (e,), "blk.{i}.ffn_norm.weight": (e,),
        "blk.{i}.attn_q.weight": (c.n_head * hd, e), "blk.{i}.attn_k.weight": (c.n_kv_head * hd, e),
        "blk.{i}.attn_v.weight": (c.n_kv_head * hd, e), "blk.{i}.attn_output.weight": (e, c.n_head * hd),
        "blk.{i}.ffn_gate.weight": (c.n_ff, e), "blk.{i}.ffn_up.weight": (c.n_ff, e),
        "blk.{i}.ffn_down.weight": (e, c.n_ff),
    }


def load_llama(f, quantized: bool | None = None, path: str | None = None, numerics: str = "float32") -> Llama:
    """A Llama from an open GGUFFile: config from metadata, weights through LLAMA_NAMES. With the C kernels (unless
    `quantized=False` or LLORCH_KERNELS=numpy), Q4_1/Q8_0/Q4_0/Q5_0 matrices are kept quantized (`QuantMatrix`,
    products computed on the stored blocks, in `numerics`) and other matrices packed (`PackedMatrix`: F16 as float16,
    others dequantized to float32); without them every tensor is a float32 array."""
    if numerics not in NUMERICS:
        raise ModelLoadError(f"numerics must be one of {', '.join(NUMERICS)}, not {numerics!r}")
    cfg = llama_config(f)
    if quantized is None:
        quantized = kernels.enabled()
    quantized = quantized and kernels.available()
    names = expand_names(LLAMA_NAMES, cfg.n_layer)
    extra = [n for n in f.tensor_names() if n not in names]
    if extra:
        raise ModelLoadError(f"{f.path}: tensor {extra[0]!r:.80} is not part of the Llama architecture this loader runs "
                             f"({len(extra)} such tensors; refusing to ignore weights)")
    shapes = _expected_shapes(cfg)
    q_order = unpermute_rows(cfg.n_head * cfg.head_dim, cfg.n_head)
    k_order = unpermute_rows(cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head)
    row_orders = {"blk.{i}.attn_q.weight": q_order, "blk.{i}.attn_k.weight": k_order}  # back to the HF rotary layout

    def load(name: str, shape: tuple[int, ...], rows: np.ndarray | None = None):
        info = f.info(name)  # ModelLoadError names a missing tensor
        if info.shape != shape:
            raise ModelLoadError(f"{f.path}: tensor {name!r} has shape {info.shape}, expected {shape} from the metadata")
        if quantized and len(shape) == 2 and info.type_name in kernels.QUANT_TYPES:
            try:
                return QuantMatrix.from_blocks(info.type_name, f.raw(name), shape, row_order=rows)
            except ValueError:  # a Q4_0 scale that cannot be rewritten: packed as float32 below
                pass
        keep16 = quantized and len(shape) == 2 and info.type_name == "F16"
        w = f.tensor(name, np.float16 if keep16 else np.float32)  # ModelLoadError names an undecodable type
        w = w if rows is None else w[rows]
        if quantized and len(shape) == 2:  # [out, in] -> [C, in, 16]; F16 / BF16 kept at 16 bits
            return PackedMatrix.from_dense(w, storage="bfloat16" if info.type_name == "BF16" else w.dtype)
        return np.ascontiguousarray(w)

    tensors: dict = {}
    order: dict[str, np.ndarray] = {}
    for pattern in LLAMA_NAMES:  # the file's order of loading: globals first, then block by block
        if "{i}" not in pattern and (pattern not in _OPTIONAL or pattern in f):
            tensors[pattern] = load(pattern, shapes[pattern])
    for i in range(cfg.n_layer):
        for pattern in LLAMA_NAMES:
            if "{i}" in pattern:
                name, rows = pattern.format(i=i), row_orders.get(pattern)
                tensors[name] = load(name, shapes[pattern], rows)
                if rows is not None:
                    order[name] = rows
        for group in FUSED:  # matrices with the same input as one kernel call: fused views (freeing the parts)
            group = [name.format(i=i) for name in group]
            kind = type(tensors[group[0]])
            if kind in (QuantMatrix, PackedMatrix) and all(type(tensors[n]) is kind for n in group):
                views = kind.fuse([tensors[n] for n in group])
                if views is not None:
                    tensors.update(zip(group, views))
        f.release_pages()  # this layer's file pages are copied: don't let them pile up in RSS
    weights = build_weights(names, tensors, LlamaWeights, LlamaBlock, cfg.n_layer)
    n_quant = set_numerics(weight_values(weights), numerics)
    if numerics != "float32" and n_quant == 0:
        raise ModelLoadError(f"{f.path}: --numerics {numerics} needs weights held quantized by the C kernels "
                             "(GGUF Q4_0/Q4_1/Q5_0/Q8_0); this model has none")
    rope = RopeTables(cfg.head_dim, cfg.rope_base, min(cfg.n_ctx, 8192), cfg.rope_linear_factor,
                      weights.rope_freqs_weight)
    f.release_pages()  # every weight is copied out of the mapping: its pages need not stay resident
    return Llama(cfg, weights, names, rope=rope, qk_row_order=order, path=path, numerics=numerics)


def gguf_tokenizer(f) -> Tokenizer:
    """The Tokenizer a GGUFFile's metadata describes."""
    info = load_gguf_tokenizer(f)
    return Tokenizer(inner=info.tokenizer, eos_token_id=info.eos_id, bos_token_id=info.bos_id, add_bos=info.add_bos,
                     chat_template=info.chat_template)


def load_gguf_model(path, tokenizer=None, decode_path: str | None = None,
                    numerics: str = "float32") -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) from a .gguf file: weights held as the kernels need them (`decode_path` "numpy": as
    float32 arrays, the path without the C extension) for `numerics`, tokenizer from its metadata (`tokenizer`:
    one already built from this file)."""
    f = GGUFFile.open(Path(path))
    model = load_llama(f, quantized=False if decode_path == "numpy" else None, path=decode_path, numerics=numerics)
    tok = tokenizer if tokenizer is not None else gguf_tokenizer(f)
    n_tok = tok.vocab_size
    if n_tok > model.vocab_size:
        raise ModelLoadError(f"{f.path}: GGUF metadata key 'tokenizer.ggml.tokens' has {n_tok} tokens but tensor "
                             f"'token_embd.weight' only {model.vocab_size} rows")
    if model.eos_token_id is None:
        model.eos_token_id = tok.eos_token_id
    return model, tok
