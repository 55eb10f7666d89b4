"""A `tokenizers.Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, the merges, the token
types and the special ids under llama.cpp's key names. We rebuild the tokenizer the
way llama.cpp (the format's reference implementation) runs it:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. The pre-tokenizer is the list of
  split regexes llama.cpp's `llm_tokenizer_bpe` applies for the file's
  `tokenizer.ggml.pre` (applied in order, matches and the text between them both kept,
  which is `tokenizers`' `Split(..., "isolated")`), then byte-level mapping without
  its own regex. For SmolLM2 (`"smollm"`) that is `\\p{N}` (every digit alone) then the
  GPT-2 regex - the same as SmolLM2's own tokenizer.json (`Digits(individual_digits)`
  + `ByteLevel`). Note transformers' GGUF converter has no entry for "smollm" and
  falls back to GPT-2's regex; on this vocabulary both give the same ids because it
  has no merges between digits, but they are different pre-tokenizers.
- `tokenizer.ggml.model == "llama"`: sentencepiece-style BPE with byte fallback, merges
  ranked by token score (what llama.cpp's SPM tokenizer does), "▁" for spaces.
- Control tokens (token_type 3) are added as special tokens and user-defined tokens
  (type 4) as non-special added tokens: both are matched whole in the input text, as
  llama.cpp does, so `<|im_start|>` is one id; `decode(..., skip_special_tokens=True)`
  drops control tokens but keeps user-defined ones, as llama.cpp's detokenizer does.
- BOS/EOS are added by a post-processor only when the file says so
  (`tokenizer.ggml.add_bos_token` / `add_eos_token`, else llama.cpp's default for
  the pre-tokenizer), so `tokenizer.encode(text).ids` equals llama.cpp's
  `llama_tokenize(text, add_special=true, parse_special=true)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from llorch_cpud.errors import ModelLoadError

__all__ = ["GGUFTokenizerInfo", "load_gguf_tokenizer", "tokenizer_from_gguf", "BPE_PRE_TOKENIZERS"]

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# ---------------------------------------------------------------- llama.cpp pre-tokenizers
# Regexes from llama.cpp src/llama-vocab.cpp (llm_tokenizer_bpe), where llama.cpp spells
# case-insensitive contractions out by hand ("'[sS]|...") in place of "(?i:...)".

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]


@dataclass(frozen=True)
class _Pre:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # llama.cpp: a whole pre-token found in the vocab is taken as is
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key


def _pre(regexes: list[str] | str, **kw: Any) -> _Pre:
    return _Pre(tuple([regexes] if isinstance(regexes, str) else regexes), **kw)


#: `tokenizer.ggml.pre` value -> the split regexes llama.cpp uses for it.
BPE_PRE_TOKENIZERS: dict[str, _Pre] = {
    "default": _pre(_DEFAULT),
    **{k: _pre(_LLAMA3, ignore_merges=True, add_bos=True) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
    **{k: _pre(_LLAMA3) for k in ("dbrx", "smaug-bpe", "chatglm-bpe", "glm4")},
    "falcon": _pre([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]),
    **{k: _pre([r"\p{N}", _GPT2]) for k in (
        "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b")},
    **{k: _pre(_GPT2) for k in (
        "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es", "jina-v2-de",
        "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion", "exaone4", "granite-docling")},
    **{k: _pre(_QWEN2) for k in ("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen", "hunyuan")},
    **{k: _pre(r" ?[^(\s|.,!?…。，、।۔،)]+") for k in ("poro-chat", "bloom", "gpt3-finnish")},
    "viking": _pre([r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"]),
    "tekken": _pre(_TEKKEN, ignore_merges=True, add_bos=True),
    **{k: _pre(_GPT4O) for k in ("gpt-4o", "llama4", "minimax-m2")},
}


@dataclass(frozen=True)
class GGUFTokenizerInfo:
    """The tokenizer plus what a generator needs to drive it."""

    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None
    add_eos: bool = False
    model: str = "gpt2"  # tokenizer.ggml.model
    pre: str | None = None  # tokenizer.ggml.pre
    eot_id: int | None = None  # end-of-turn id (tokenizer.ggml.eot_token_id, else "<|im_end|>"/"<|eot_id|>"/...)
    pad_id: int | None = None
    unk_id: int | None = None
    control_ids: frozenset[int] = field(default_factory=frozenset)  # token_type 3: never shown as text

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation: EOS and end-of-turn."""
        return frozenset(i for i in (self.eos_id, self.eot_id) if i is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _require(metadata: dict[str, Any], key: str, kind: type, where: str,
             of: type | tuple[type, ...] | None = None) -> Any:
    if key not in metadata:
        raise ModelLoadError(f"{where}missing required GGUF metadata key {key!r}")
    value = metadata[key]
    if not isinstance(value, kind):
        raise ModelLoadError(
            f"{where}GGUF metadata key {key!r} should be {kind.__name__}, got {type(value).__name__}")
    if of is not None:
        _check_elements(value, key, of, where)
    return value


def _check_elements(values: list, key: str, of: type | tuple[type, ...], where: str) -> None:
    """ModelLoadError naming the key unless every element is an `of` (a bool is not a number here)."""
    kinds = of if isinstance(of, tuple) else (of,)
    for i, v in enumerate(values):
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            want = "/".join(k.__name__ for k in kinds)
            raise ModelLoadError(f"{where}GGUF metadata key {key!r} should be an array of {want}, but element {i} is "
                                 f"{type(v).__name__} {v!r:.40}")


#: The longest token text a sentencepiece vocabulary may hold here. Its merges are derived by trying every split of
#: every token (`_spm_merges`), work quadratic in a token's length: a 200k-character token took ~10 s. Real
#: sentencepiece vocabularies (Llama 2, Mistral, Gemma) have no token longer than ~100 characters.
MAX_SPM_TOKEN_CHARS = 1024


def _optional_id(metadata: dict[str, Any], key: str, n_vocab: int, where: str) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{where}GGUF metadata key {key!r} should be a token id, got {value!r:.40}")
    if not 0 <= value < n_vocab:  # llama.cpp warns and ignores an out-of-range special id
        return None
    return value


def _add_added_tokens(tok: Tokenizer, tokens: list[str], types: list[int], where: str) -> frozenset[int]:
    control, user = [], []
    control_ids = []
    for i, (text, ttype) in enumerate(zip(tokens, types)):
        if ttype == TOKEN_TYPE_CONTROL:
            control.append(AddedToken(text, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False))
            control_ids.append(i)
        elif ttype == TOKEN_TYPE_USER_DEFINED:
            user.append(AddedToken(text, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False))
    size = tok.get_vocab_size(with_added_tokens=True)
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != size:  # an added token got an id outside the vocabulary
        raise ModelLoadError(f"{where}an added/special token text is not in GGUF metadata key 'tokenizer.ggml.tokens'")
    return frozenset(control_ids)


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated text keeps its first id
    return vocab


def _build_bpe(metadata: dict[str, Any], tokens: list[str], where: str) -> tuple[Tokenizer, bool]:
    merges_raw = _require(metadata, "tokenizer.ggml.merges", list, where, of=str)
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.merges' has a bad merge {m!r:.40}")
        merges.append((left, right))
    pre_name = metadata.get("tokenizer.ggml.pre")
    pre = BPE_PRE_TOKENIZERS.get(pre_name) if isinstance(pre_name, str) else None
    if pre is None:
        if pre_name is None or pre_name == "":
            pre = BPE_PRE_TOKENIZERS["default"]  # what llama.cpp does for a file without the key
        else:
            raise ModelLoadError(
                f"{where}unsupported GGUF metadata value tokenizer.ggml.pre = {pre_name!r:.60} "
                f"(supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))})")
    try:
        bpe = models.BPE(vocab=_vocab(tokens), merges=merges, fuse_unk=False, byte_fallback=False,
                         ignore_merges=pre.ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. "Token `zz` out of vocabulary"
        raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.merges' does not fit "
                             f"'tokenizer.ggml.tokens' ({' '.join(str(e).split())[:200]})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, pre.add_bos


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: (a, b) for every a+b in the vocabulary with a, b
    in it too, best (highest-scoring) result first - the order llama.cpp's SPM tokenizer merges in."""
    vocab = _vocab(tokens)
    ranked = []
    for i, t in enumerate(tokens):
        if len(t) < 2 or (types and types[i] not in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED)):
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, k, a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _build_spm(metadata: dict[str, Any], tokens: list[str], types: list[int], where: str) -> tuple[Tokenizer, bool]:
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if not isinstance(scores, list):
        raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.scores' should be list, got {type(scores).__name__}")
    _check_elements(scores, "tokenizer.ggml.scores", (int, float), where)
    if len(scores) != len(tokens):
        raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.scores' has {len(scores)} "
                             f"entries for {len(tokens)} tokens")
    longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
    if len(tokens[longest]) > MAX_SPM_TOKEN_CHARS:
        raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.tokens': token {longest} is "
                             f"{len(tokens[longest])} characters long; a sentencepiece vocabulary may hold tokens of at "
                             f"most {MAX_SPM_TOKEN_CHARS}")
    unk_id = _optional_id(metadata, "tokenizer.ggml.unknown_token_id", len(tokens), where)
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=_spm_merges(tokens, scores, types),
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("\u2581")] if add_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok, True


_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|end_of_text|>")


def load_gguf_tokenizer(metadata: Any, source: str | None = None) -> GGUFTokenizerInfo:
    """Build the tokenizer a GGUF file describes from its metadata.

    `metadata` is `GGUFFile.metadata` (a dict) or the `GGUFFile` itself; `source` (default:
    the file's path) is named in every ModelLoadError.
    """
    if not isinstance(metadata, dict) and hasattr(metadata, "metadata"):
        source = source or getattr(metadata, "path", None)
        metadata = metadata.metadata
    where = f"{source}: " if source else ""
    model = _require(metadata, "tokenizer.ggml.model", str, where)
    tokens = _require(metadata, "tokenizer.ggml.tokens", list, where, of=str)
    if not tokens:
        raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.tokens' is empty")
    types = metadata.get("tokenizer.ggml.token_type") or []
    if not isinstance(types, list):
        raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.token_type' should be list, "
                             f"got {type(types).__name__}")
    _check_elements(types, "tokenizer.ggml.token_type", int, where)
    if types and len(types) != len(tokens):
        raise ModelLoadError(f"{where}GGUF metadata key 'tokenizer.ggml.token_type' has {len(types)} "
                             f"entries for {len(tokens)} tokens")
    if model == "gpt2":
        tok, default_add_bos = _build_bpe(metadata, tokens, where)
    elif model == "llama":
        tok, default_add_bos = _build_spm(metadata, tokens, types, where)
    else:
        raise ModelLoadError(
            f"{where}unsupported GGUF metadata value tokenizer.ggml.model = {model!r:.60} "
            f"(supported: 'gpt2', 'llama')")
    control_ids = _add_added_tokens(tok, tokens, types, where)

    n = len(tokens)
    bos_id = _optional_id(metadata, "tokenizer.ggml.bos_token_id", n, where)
    eos_id = _optional_id(metadata, "tokenizer.ggml.eos_token_id", n, where)
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    add_bos = bool(add_bos) and bos_id is not None
    add_eos = bool(add_eos) and eos_id is not None
    if add_bos or add_eos:
        single = ([f"{tokens[bos_id]}:0"] if add_bos else []) + ["$A:0"] + ([f"{tokens[eos_id]}:0"] if add_eos else [])
        pair = single + ["$B:1"] + ([f"{tokens[eos_id]}:1"] if add_eos else [])
        special = [(tokens[i], i) for i in {bos_id if add_bos else None, eos_id if add_eos else None} if i is not None]
        try:
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
        except ValueError as e:  # e.g. a token text with ':' in it: the template's own separator
            ends = (("bos", add_bos), ("eos", add_eos))
            keys = " / ".join(repr(f"tokenizer.ggml.{k}_token_id") for k, on in ends if on)
            raise ModelLoadError(f"{where}GGUF metadata key {keys} names a token whose text cannot be added at the "
                                 f"ends of the input ({' '.join(str(e).split())[:120]})") from None

    eot_id = _optional_id(metadata, "tokenizer.ggml.eot_token_id", n, where)
    if eot_id is None:
        for text in _EOT_TEXTS:
            i = tok.token_to_id(text)
            if i is not None and (not types or types[i] == TOKEN_TYPE_CONTROL):
                eot_id = i
                break
    template = metadata.get("tokenizer.chat_template")
    return GGUFTokenizerInfo(
        tokenizer=tok, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, add_eos=add_eos,
        chat_template=template if isinstance(template, str) else None,
        model=model, pre=metadata.get("tokenizer.ggml.pre"), eot_id=eot_id,
        pad_id=_optional_id(metadata, "tokenizer.ggml.padding_token_id", n, where),
        unk_id=_optional_id(metadata, "tokenizer.ggml.unknown_token_id", n, where),
        control_ids=control_ids)


def tokenizer_from_gguf(metadata: Any, source: str | None = None) -> Tokenizer:
    """Just the `tokenizers.Tokenizer` (see `load_gguf_tokenizer` for the ids and flags)."""
    return load_gguf_tokenizer(metadata, source).tokenizer
