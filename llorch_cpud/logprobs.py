"""Log-probabilities of tokens, from the model's logits.

What is reported is the model's own distribution: log-softmax, in float64, of the float32 logits the
head produced for that position - before the repetition penalty, temperature, top-k, top-p and min-p
(the distribution OpenAI and vLLM report). A token's entry holds its own log-probability and the `k`
most likely tokens of that position (ties: the lower id first).

`TokenLogprob` is what the engine attaches to its events; `TokenTexts` turns ids into the strings and
bytes the OpenAI shapes show (a token that is not whole UTF-8 on its own - part of a character - is
shown as OpenAI does, `bytes:\\xe2\\x80`, with its raw bytes in `bytes`).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

import numpy as np

MAX_TOP = 20  # the most alternatives a request may ask for (OpenAI's limit)
ROWS_PER_BLOCK = 64  # prompt rows whose logits are held at once (64 x vocab float32: 13 MB for GPT-2)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[rows, vocab] (or [vocab]) float32 logits -> float64 log-probabilities (max-shifted, one log-sum-exp)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))
    return z - lse


def top_k(lp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k largest entries of one row [vocab], most likely first, ties by lower id."""
    if k <= 0:
        return []
    k = min(k, lp.shape[0])
    idx = np.argpartition(-lp, k - 1)[:k] if k < lp.shape[0] else np.arange(lp.shape[0])
    kth = lp[idx].min()
    idx = np.flatnonzero(lp >= kth)  # every token tied with the k-th, ascending ids
    idx = idx[np.argsort(-lp[idx], kind="stable")][:k]
    return [(int(i), float(lp[i])) for i in idx]


def entries(logits: np.ndarray, targets: list[int], k: int) -> list[TokenLogprob]:
    """One entry per row of logits [rows, vocab]: the log-probability of targets[row] and the top k."""
    lp = log_softmax(logits)
    return [TokenLogprob(int(t), float(lp[r, t]), top_k(lp[r], k)) for r, t in enumerate(targets)]


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Bytes and display strings of token ids for one tokenizer (cached)."""

    def __init__(self, tokenizer):
        self.inner = tokenizer.inner
        self.byte_level = type(getattr(self.inner, "decoder", None)).__name__ == "ByteLevel"
        self.byte_dec = _byte_decoder()
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            s = self.inner.id_to_token(int(token_id))
            if s is None:
                b = b""
            elif self.byte_level and all(c in self.byte_dec for c in s):
                b = bytes(self.byte_dec[c] for c in s)
            elif (m := BYTE_TOKEN.fullmatch(s)) is not None:
                b = bytes([int(m.group(1), 16)])
            else:
                b = (s if self.byte_level else s.replace("\u2581", " ")).encode("utf-8")
            if len(self._cache) < 1 << 16:
                self._cache[token_id] = b
        return b

    def text(self, token_id: int) -> str:
        """The token as OpenAI shows it: its text, or `bytes:\\x..` when its bytes are not whole UTF-8."""
        b = self.bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Character offset of each token in the text of the tokens' bytes joined (from `start`): a token
        that begins inside a character is at the offset of that character."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out, n = [], start
        for i in ids:
            out.append(n)
            n += len(dec.decode(self.bytes(i)))
        return out


# ---------------------------------------------------------------------------- OpenAI shapes


def completion_logprobs(texts: TokenTexts, items: list[TokenLogprob | None], ids: list[int], start: int = 0) -> dict:
    """/v1/completions' legacy shape for tokens `ids` (items[i] None: no log-probability, the first prompt token)."""
    items = list(items) + [None] * (len(ids) - len(items))  # (a prompt cancelled before it was all scored)
    return {
        "tokens": [texts.text(i) for i in ids],
        "token_logprobs": [None if e is None else e.logprob for e in items],
        "top_logprobs": [None if e is None else {texts.text(t): lp for t, lp in e.top} for e in items],
        "text_offset": texts.offsets(ids, start),
    }


def chat_logprobs(texts: TokenTexts, items: list[TokenLogprob]) -> list[dict]:
    """/v1/chat/completions' `logprobs.content` entries."""
    def one(t: int, lp: float) -> dict:
        return {"token": texts.text(t), "logprob": lp, "bytes": list(texts.bytes(t))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in items]


def execute_logprobs(texts: TokenTexts, items: list[TokenLogprob]) -> list[dict]:
    """/execute's per-token entries: id, text, logprob and the top alternatives."""
    return [{"id": e.token_id, "token": texts.text(e.token_id), "logprob": e.logprob,
             "top_logprobs": [{"id": t, "token": texts.text(t), "logprob": lp} for t, lp in e.top]} for e in items]
