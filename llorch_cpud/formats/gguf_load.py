"""A .gguf file as a Llama model and its tokenizer (formats/gguf.py reads the file; models/llama.py computes).

Kept apart from the reader, which the tokenizer-only users (bench's peer runners, scripts) import without
the model code and the C kernels.
"""

from __future__ import annotations

from pathlib import Path

from llorch_cpud.errors import ModelLoadError
from llorch_cpud.formats.gguf import GGUFFile
from llorch_cpud.models.llama import Llama, load_llama
from llorch_cpud.tokenizer import Tokenizer
from llorch_cpud.tokenizer.gguf import load_gguf_tokenizer


def gguf_tokenizer(f) -> Tokenizer:
    """The Tokenizer a GGUFFile's metadata describes."""
    info = load_gguf_tokenizer(f)
    return Tokenizer(inner=info.tokenizer, eos_token_id=info.eos_id, bos_token_id=info.bos_id, add_bos=info.add_bos,
                     chat_template=info.chat_template)


def load_gguf_model(path, tokenizer=None, decode_path: str | None = None) -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) from a .gguf file: weights held as the kernels need them (`decode_path` "numpy": as
    float32 arrays, the path without the C extension), tokenizer from its metadata (`tokenizer`: one already
    built from this file)."""
    f = GGUFFile.open(Path(path))
    model = load_llama(f, quantized=False if decode_path == "numpy" else None, path=decode_path)
    tok = tokenizer if tokenizer is not None else gguf_tokenizer(f)
    n_tok = tok.vocab_size
    if n_tok > model.vocab_size:
        raise ModelLoadError(f"{f.path}: GGUF metadata key 'tokenizer.ggml.tokens' has {n_tok} tokens but tensor "
                             f"'token_embd.weight' only {model.vocab_size} rows")
    if model.eos_token_id is None:
        model.eos_token_id = tok.eos_token_id
    return model, tok
