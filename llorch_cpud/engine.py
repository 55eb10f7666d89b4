"""The generation loop: prefill, one-token decode steps, batching, UTF-8-safe streaming, stops.

A `Sequence` is one request in flight: its tokens, its KV cache, its sampler state and its
text stream. `Engine.step(seqs)` advances any number of sequences by one forward pass —
the rows of all of them go through the model's matrix products together, attention runs
per sequence. `Engine.generate` is the single-request loop built on the same step; the
server's scheduler calls `step` with every active request, the CLI and the validator call
`generate`. There is no other copy of this loop.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from llorch_cpud.errors import ContextOverflow, InvalidRequest
from llorch_cpud.formats import load_model, resolve
from llorch_cpud.formats.generation_defaults import SamplingDefaults, read_sampling_defaults
from llorch_cpud.logprobs import ROWS_PER_BLOCK, TokenLogprob, entries
from llorch_cpud.models.base import Model, Segment
from llorch_cpud.sampling import SamplingParams, make_rng, sample
from llorch_cpud.structured import Constraints, Grammar
from llorch_cpud.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4


@dataclass
class Request:
    prompt: str | None = None
    prompt_ids: list[int] | None = None  # used instead of `prompt` when given
    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: the engine picks one and reports it
    stop: list[str] = field(default_factory=list)
    job_id: str = ""
    # Teacher forcing (the validator's decode checkpoints): generated token i is forced_tokens[i], whatever the
    # sampler picked (`Sequence.picks` keeps its picks); past the list, generation goes on as usual.
    forced_tokens: list[int] | None = None
    # Log-probabilities (logprobs.py: the model's distribution, before penalties and temperature): with `logprobs`
    # = k (0..20) every generated token carries its log-probability and the k most likely tokens; with
    # `prompt_logprobs` every prompt token but the first does too (the prefill computes the logits of every prompt
    # row). max_tokens may be 0 only with prompt_logprobs (the prompt is scored, nothing generated).
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # Structured output (structured.py): a compiled grammar (`Engine.constraints.compile`). Every step the tokens
    # it does not allow are masked out of the logits before sampling (so the full logits are computed: never the
    # greedy head screen), and once it is complete the sequence ends as if EOS were sampled (stop_reason eos).
    grammar: Grammar | None = None


@dataclass
class TokenEvent:
    text: str  # a UTF-8-complete piece; may cover several tokens
    index: int  # index of this piece, from 0
    token_ids: list[int]  # the tokens this piece completes
    logprobs: list[TokenLogprob] | None = None  # with Request.logprobs: every token since the previous piece


@dataclass
class EndEvent:
    stop_reason: str  # max_tokens | eos (also: a grammar completed) | stop_sequence | cancelled
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    seed: int
    stop_sequence_matched: str | None = None
    prefill_time_ms: float = 0.0
    decode_time_ms: float = 0.0
    token_logprobs: list[TokenLogprob] | None = None  # with Request.logprobs: one per generated token but EOS
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with Request.prompt_logprobs: [None, ...] per prompt token

    @property
    def tokens_out(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_sec(self) -> float:
        n = max(len(self.token_ids) - 1, 0)  # the first token comes from prefill
        return n / (self.decode_time_ms / 1000.0) if self.decode_time_ms > 0 else 0.0


@dataclass
class ErrorEvent:
    """A sequence ended by an error of its own (its sampler failed, its logits held a NaN, its time ran out);
    the other sequences of the step go on."""

    code: str  # INFERENCE_FAILED | TIMEOUT
    message: str


class TextStream:
    """Incremental detokenisation that only releases complete characters and never a stop string.

    The text released so far is always a prefix of `decode(all tokens)`; `finish()` releases
    the rest, so the concatenation of all pieces equals the decoded generation (cut before a
    matched stop string).

    Constant work per token: a push decodes a bounded window of recent ids, never the whole
    generation (the scheme of text-generation-inference's `decode_token` and `tokenizers`'
    `DecodeStream`). The window is `ids[p:]`: the context `ids[p:r]`, ids whose text is already
    known (settled), then the pending ids `ids[r:]`. The pending ids' text is
    `decode(window)[len(decode(context)):]` - decoded after their context, so a decoder that
    treats the first token differently (SentencePiece's leading-space strip) does so on the
    context's first token, the same in both decodes. When that text does not end in U+FFFD (what
    an incomplete UTF-8 sequence decodes to) it is settled: it can no longer change, and the
    pending ids become the next context. While it does end in U+FFFD the pending ids stay; if more
    than MAX_PENDING of them pile up (only a run of invalid bytes or of literal U+FFFD does that),
    the latest point where splitting the window leaves the decoded text unchanged is settled
    instead (for byte-level BPE that is exactly a point where UTF-8 decoding starts afresh, so
    later ids cannot change what is before it).

    Same text as decoding everything for decoders whose output for a sequence is stable once it
    does not end in U+FFFD: byte-level BPE (GPT-2, GGUF "gpt2"), and SentencePiece with byte
    fallback on valid UTF-8. (With byte fallback, a run of byte tokens that is invalid UTF-8 as
    a whole decodes to one U+FFFD per byte, which can retract a character already decoded: the
    full re-decode this replaced could not stream that exactly either.)"""

    MAX_PENDING = 8  # pending ids that may pile up while their text ends in U+FFFD

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []  # every id pushed
        self.released = 0  # characters of the text released so far
        self.matched: str | None = None
        self._eos = tokenizer.eos_token_id  # no text (decode_generated drops it)
        self._win: list[int] = []  # ids[p:], EOS left out
        self._n_ctx = 0  # the context: the first _n_ctx ids of the window, whose text is settled
        self._ctx = ""  # decode(context), on its own
        self._pending = ""  # the text of the pending ids (may end in U+FFFD, may still change)
        self._settled = 0  # characters of settled text
        self._tail = ""  # settled text from character _tail_start on (what a stop string may still touch)
        self._tail_start = 0
        self._out: list[str] = []  # the pieces released

    def push(self, token_id: int) -> str:
        """Add a token; return the newly releasable text ('' while a character or stop prefix is pending)."""
        self.ids.append(token_id)
        if token_id == self._eos or self.matched is not None:
            return ""
        self._win.append(token_id)
        self._decode_window()
        stable = self._settled + len(self._pending.rstrip("\ufffd"))
        if self.stop:
            hit = self._find_stop()
            if hit is not None:
                end, self.matched = hit
                return self._release(end)
            stable = min(stable, self.released + self._safe_len(self._text(self.released, stable)))
        return self._release(stable)

    def finish(self) -> str:
        """Release whatever is held at the end of generation (a stop-string prefix or a dangling byte)."""
        if self.matched is not None:
            return ""
        return self._release(self._settled + len(self._pending))

    @property
    def final_text(self) -> str:
        done = "".join(self._out)
        return done if self.matched is not None else done + self._text(self.released)

    @property
    def text(self) -> str:
        """The decoded text of all ids so far (built on demand)."""
        return "".join(self._out) + self._text(self.released)

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode_generated(ids)

    def _decode_window(self) -> None:
        win, n_ctx = self._win, self._n_ctx
        full = self._decode(win)
        pending = full[len(self._ctx):]
        if not pending.endswith("\ufffd"):  # settled: the pending ids become the context
            self._settle(pending, win[n_ctx:], None)
        elif len(win) - n_ctx > self.MAX_PENDING:
            self._pending = pending
            self._split(full)
        else:
            self._pending = pending

    def _settle(self, text: str, ctx_ids: list[int], ctx_text: str | None, rest: str = "",
                more: list[int] = ()) -> None:
        """Settle `text`; `ctx_ids` (whose text is ctx_text) become the context, `more` the pending ids."""
        self._tail += text
        self._settled += len(text)
        self._win = list(ctx_ids) + list(more)
        self._n_ctx = len(ctx_ids)
        self._ctx = self._decode(ctx_ids) if ctx_text is None else ctx_text
        self._pending = rest

    def _split(self, full: str) -> None:
        """Settle the pending ids up to the latest point j where decoding afresh from j changes nothing:
        decode(window[:j]) + decode(window[j:]) == decode(window). For byte-level BPE that holds exactly
        where UTF-8 decoding restarts in the full text, which no later byte can move."""
        win, n_ctx, ctx = self._win, self._n_ctx, self._ctx
        for j in range(len(win) - 1, n_ctx, -1):
            head = self._decode(win[:j])
            if head.startswith(ctx) and head + self._decode(win[j:]) == full:
                self._settle(head[len(ctx):], [], "", full[len(head):], win[j:])
                return
        # No such point (a decoder that is not self-synchronising): keep the window; exactness first.

    def _text(self, start: int, end: int | None = None) -> str:
        """Characters [start, end) of the text so far; start >= _tail_start."""
        buf = self._tail + self._pending
        return buf[start - self._tail_start : None if end is None else end - self._tail_start]

    def _release(self, end: int) -> str:
        piece = self._text(self.released, end) if end > self.released else ""
        self.released = max(self.released, end)
        if piece:
            self._out.append(piece)
        # Forget the settled text that neither a stop string nor a later release can touch.
        keep = min(self._settled, max(0, self.released - max(self._longest - 1, 0)))
        if keep > self._tail_start:
            self._tail = self._tail[keep - self._tail_start :]
            self._tail_start = keep
        return piece

    def _find_stop(self) -> tuple[int, str] | None:
        search_from = max(0, self.released - self._longest + 1)
        text = self._text(search_from)
        best = None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return None if best is None else (search_from + best[0], best[1])

    def _safe_len(self, pending: str) -> int:
        """Length of the prefix of `pending` that cannot be the start of a stop string."""
        for i in range(len(pending)):
            tail = pending[i:]
            if any(s.startswith(tail) for s in self.stop):
                return i
        return len(pending)


class Sequence:
    """One request in flight. Its KV cache holds `max_seq` positions (prompt + max_tokens); it is allocated
    here, or with `defer_cache` by `allocate_cache` (the server's scheduler, when the job is admitted, so
    that queued requests hold no cache) or at the latest by the first step."""

    def __init__(self, engine: "Engine", request: Request, defer_cache: bool = False):
        self.engine = engine
        self.request = request
        if request.max_tokens < (0 if request.prompt_logprobs else 1):
            raise InvalidRequest(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.logprobs is not None and not 0 <= request.logprobs <= 20:
            raise InvalidRequest(f"logprobs must be in [0, 20], got {request.logprobs}")
        if len(request.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(request.stop)}")
        request.sampling.check()
        if request.prompt_ids is not None:
            self.prompt_ids = [int(t) for t in request.prompt_ids]
        else:
            self.prompt_ids = engine.tokenizer.encode(request.prompt or "")
        if not self.prompt_ids:
            raise InvalidRequest("prompt: encodes to no tokens")
        bad = [t for t in self.prompt_ids if not 0 <= t < engine.model.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_ids: token id {bad[0]} outside vocabulary [0, {engine.model.vocab_size})")
        need = len(self.prompt_ids) + request.max_tokens
        if need > engine.model.n_ctx:
            raise ContextOverflow(
                f"prompt ({len(self.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) = {need} "
                f"exceeds the model's context length {engine.model.n_ctx}"
            )
        self.seed = request.seed if request.seed is not None else secrets.randbits(63)
        self.rng = make_rng(self.seed)
        self.max_seq = need  # positions of the KV cache
        self.cache = None if defer_cache else engine.model.new_cache(need)
        self.pos = 0  # tokens already in the cache
        self.pending = list(self.prompt_ids)  # tokens to feed in the next step
        self.generated: list[int] = []
        self.picks: list[int] = []  # what the sampler (or the model's greedy pick) chose at each step
        self.stream = TextStream(engine.tokenizer, request.stop)
        self.n_events = 0
        self.cancelled = threading.Event()
        self.end: EndEvent | None = None
        self.error: ErrorEvent | None = None
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.last_logits: np.ndarray | None = None
        self.keep_logits = False  # the validator's checkpoint 9: compute the full logits even for greedy picks
        # At most this many pending tokens go into the next step (None: all): a long prompt is prefilled in chunks,
        # interleaved with the other sequences' decode steps (the scheduler sets it); nothing is sampled until the
        # prompt's last chunk.
        self.chunk: int | None = None
        k = request.logprobs
        self.top_n = k or 0  # alternatives per entry
        self.token_logprobs: list[TokenLogprob] | None = [] if k is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if request.prompt_logprobs else None
        self._lp_sent = 0  # token_logprobs already attached to a TokenEvent
        self.matcher = engine.constraints.matcher(request.grammar) if request.grammar is not None else None

    @property
    def done(self) -> bool:
        return self.end is not None or self.error is not None

    def allocate_cache(self) -> None:
        """Allocate the KV cache now if it was deferred (not after the sequence ended: that freed it)."""
        if self.cache is None and not self.done:
            self.cache = self.engine.model.new_cache(self.max_seq)

    def segment(self) -> Segment:
        self.allocate_cache()
        n = len(self.pending) if self.chunk is None else max(1, min(self.chunk, len(self.pending)))
        return Segment(self.cache, self.pos, n)

    def advance(self, n: int) -> None:
        """A chunk of n pending tokens went into the cache and the prompt goes on: nothing to sample yet."""
        self.pos += n
        self.pending = self.pending[n:]

    @property
    def greedy_only(self) -> bool:
        """Whether the next token is the plain argmax of the logits (no penalty), so the model may pick
        it without the full head product (`Model.greedy_tokens`)."""
        p = self.request.sampling
        return (p.greedy and p.repetition_penalty == 1.0 and not self.keep_logits and self.token_logprobs is None
                and self.matcher is None)

    @property
    def in_prompt(self) -> bool:
        return self.pos < len(self.prompt_ids)

    def score_prompt_rows(self, model, hidden: np.ndarray) -> None:
        """Log-probabilities of the prompt tokens that this chunk's rows `hidden` [n, n_embd] predict (row r, at
        position pos + r, predicts prompt token pos + r + 1; the prompt's last row predicts the first generated
        token, which `accept` scores). The logits are computed ROWS_PER_BLOCK rows at a time."""
        n = min(hidden.shape[0], len(self.prompt_ids) - 1 - self.pos)
        for a in range(0, max(n, 0), ROWS_PER_BLOCK):
            b = min(n, a + ROWS_PER_BLOCK)
            targets = self.prompt_ids[self.pos + a + 1 : self.pos + b + 1]
            self.prompt_logprobs += entries(model.logits(hidden[a:b]), targets, self.top_n)

    def finish_prompt(self) -> list:
        """max_tokens 0: the prompt went in (and was scored); end without generating."""
        self.pos += len(self.pending)
        self.pending = []
        return [self._finish("cancelled" if self.cancelled.is_set() else "max_tokens")]

    def accept(self, logits: np.ndarray | None, token: int | None = None) -> list:
        """Sample from the last row's logits [vocab] (or take `token`, the model's greedy pick when
        `greedy_only`); return the events this token produces."""
        self.pos += len(self.pending)
        self.last_logits = logits  # what the sampler saw (checkpoint 9)
        if self.cancelled.is_set():
            return [self._finish("cancelled")]
        if token is None:
            allowed = self.matcher.allowed() if self.matcher is not None else None  # [vocab] bool or None
            token = sample(logits, self.request.sampling, self.rng, history=self.prompt_ids + self.generated,
                           allowed=allowed)
        token = int(token)
        self.picks.append(token)
        forced = self.request.forced_tokens
        if forced is not None and len(self.generated) < len(forced):
            token = int(forced[len(self.generated)])
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.generated.append(token)
        self.pending = [token]
        if self.token_logprobs is not None and token != self.engine.eos_token_id:  # EOS has no text: no entry
            self.token_logprobs += entries(logits[None, :], [token], self.top_n)
        events = []
        if token == self.engine.eos_token_id:
            events += self._piece(self.stream.finish(), [token])
            return events + [self._finish("eos")]
        if self.matcher is not None:
            self.matcher.consume(token)
        events += self._piece(self.stream.push(token), [token])
        if self.stream.matched is not None:
            return events + [self._finish("stop_sequence")]
        if self.matcher is not None and self.matcher.done:  # the grammar is complete: only EOS could follow
            events += self._piece(self.stream.finish(), [])
            return events + [self._finish("eos")]
        if len(self.generated) >= self.request.max_tokens:
            events += self._piece(self.stream.finish(), [])
            return events + [self._finish("max_tokens")]
        return events

    def cancel_now(self) -> list:
        """End a sequence between steps (client gone, cancel request, shutdown)."""
        if self.done:
            return []
        return [self._finish("cancelled")]

    def fail(self, code: str, message: str) -> list:
        """End this sequence alone with an error (frees its KV cache); [] if it has already ended."""
        if self.done:
            return []
        self.error = ErrorEvent(code, message)
        self.cache = None
        return [self.error]

    def accept_or_fail(self, logits: np.ndarray | None, token: int | None = None) -> list:
        """`accept`, except that an exception ends this sequence alone with INFERENCE_FAILED."""
        try:
            return self.accept(logits, token)
        except Exception as e:  # noqa: BLE001 - reported in the sequence's error event
            return self.fail("INFERENCE_FAILED", f"sampling failed: {type(e).__name__}: {e}")

    def _piece(self, text: str, ids: list[int]) -> list:
        if not text:
            return []
        ev = TokenEvent(text=text, index=self.n_events, token_ids=ids)
        if self.token_logprobs is not None:
            ev.logprobs = self.token_logprobs[self._lp_sent :]
            self._lp_sent = len(self.token_logprobs)
        self.n_events += 1
        return [ev]

    def _finish(self, reason: str) -> EndEvent:
        now = time.perf_counter()
        first = self.t_first or now
        self.end = EndEvent(
            stop_reason=reason,
            prompt_ids=self.prompt_ids,
            token_ids=list(self.generated),
            text=self.stream.final_text,
            seed=self.seed,
            stop_sequence_matched=self.stream.matched,
            prefill_time_ms=(first - self.t_start) * 1000.0,
            decode_time_ms=(now - first) * 1000.0,
            token_logprobs=None if self.token_logprobs is None else list(self.token_logprobs),
            prompt_logprobs=self.prompt_logprobs,
        )
        self.cache = None  # free the KV cache now, not when the last reference goes
        return self.end


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, name: str = "model"):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        eos = tokenizer.eos_token_id
        self.eos_token_id = eos if eos is not None else model.eos_token_id
        self.constraints = Constraints(tokenizer, model.vocab_size, self.eos_token_id)  # structured output
        # What generate and the OpenAI routes use for fields a request leaves out (load_engine reads the model's)
        self.sampling_defaults = SamplingDefaults()

    def start(self, request: Request, defer_cache: bool = False) -> Sequence:
        return Sequence(self, request, defer_cache)

    def step(self, seqs: list[Sequence], trace: dict | None = None) -> list[list]:
        """One forward pass over every live sequence; returns each one's new events."""
        live = [s for s in seqs if not s.done]
        if not live:
            return [[] for _ in seqs]
        segments = [s.segment() for s in live]
        tokens = np.array([t for s, seg in zip(live, segments) for t in s.pending[: seg.length]], dtype=np.int64)  # [rows]
        hidden = self.model.forward(tokens, segments, trace)  # [rows, n_embd]
        ends = np.cumsum([seg.length for seg in segments])
        last = hidden[ends - 1]  # [n_seq, n_embd] one row per sequence
        out = {}
        for s, seg, e in zip(live, segments, ends):
            if s.prompt_logprobs is not None and s.in_prompt:
                try:  # the logits of every prompt row of this chunk (echo's prompt log-probabilities)
                    s.score_prompt_rows(self.model, hidden[e - seg.length : e])
                except Exception as exc:  # noqa: BLE001 - this sequence alone fails
                    out[id(s)] = s.fail("INFERENCE_FAILED", f"prompt logprobs failed: {type(exc).__name__}: {exc}")
        ready = [j for j, (s, seg) in enumerate(zip(live, segments)) if seg.length == len(s.pending) and not s.done]
        for s, seg in zip(live, segments):
            if seg.length < len(s.pending) and not s.done:
                s.advance(seg.length)  # a prompt chunk: no token this step
        for j in [j for j in ready if live[j].request.max_tokens == 0]:
            out[id(live[j])] = live[j].finish_prompt()  # echo of a scored prompt, nothing to generate
        ready = [j for j in ready if live[j].request.max_tokens > 0]
        greedy = [j for j in ready if live[j].greedy_only] if trace is None else []
        picks = self.model.greedy_tokens(last[greedy]) if greedy else None  # [n_greedy] or None (no screen)
        if picks is None:
            greedy = []
        sampled = [j for j in ready if j not in set(greedy)]
        logits = self.model.logits(last[sampled]) if sampled else None  # [n_sampled, vocab]
        out.update({id(live[j]): live[j].accept_or_fail(None, picks[i]) for i, j in enumerate(greedy)})
        out.update({id(live[j]): live[j].accept_or_fail(logits[i]) for i, j in enumerate(sampled)})
        return [out.get(id(s), []) for s in seqs]

    def generate(self, request: Request) -> Iterator[TokenEvent | EndEvent]:
        """Generate for one request, yielding pieces as tokens are produced, then one EndEvent."""
        seq = self.start(request)
        while not seq.done:
            if seq.cancelled.is_set():
                yield from seq.cancel_now()
                break
            yield from self.step([seq])[0]

    def prefill_logits(self, prompt_ids: list[int], trace: dict | None = None) -> np.ndarray:
        """All-position logits of a prompt with a fresh cache: [seq] -> [seq, vocab] (checkpoint 8).

        The head runs one row at a time — the same matrix-vector product `step` uses for a
        single sequence — so the last row is bit-identical to what the sampler sees (checkpoint 9)."""
        cache = self.model.new_cache(len(prompt_ids))
        hidden = self.model.forward(np.array(prompt_ids, dtype=np.int64), [Segment(cache, 0, len(prompt_ids))], trace)
        return np.concatenate([self.model.logits(hidden[i : i + 1]) for i in range(hidden.shape[0])])  # [seq, vocab]


def load_engine(spec: str | None, numerics: str = "float32", tokenizer=None, decode_path: str | None = None):
    """(Engine, local path) for a --model value (formats.load_model's arguments): what the CLI, the server's
    loader thread, the benchmark and the tests run."""
    path = resolve(spec)
    model, tokenizer, name = load_model(str(path) if spec is None else spec, numerics=numerics, tokenizer=tokenizer,
                                        decode_path=decode_path)
    engine = Engine(model, tokenizer, name=name)
    engine.sampling_defaults = read_sampling_defaults(path)
    return engine, path
