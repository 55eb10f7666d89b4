"""The engine thread: the only thread that runs model math.

Requests arrive as `Job`s (an engine `Sequence` already validated and tokenised by the HTTP
side) through a thread-safe inbox. Each loop iteration of the engine thread:

1. moves new jobs from the inbox to the waiting line and ends every job whose cancel flag
   is set (POST /cancel, client disconnect, shutdown) — its KV cache is freed and its
   stream gets its terminal event — and every job past its deadline (`error` TIMEOUT);
2. admits waiting jobs while fewer than `max_batch` are active;
3. runs ONE `Engine.step` over every job in decode (one row each) and the next chunks of the
   admitted-but-not-prefilled jobs' prompts, oldest first (`Sequence.chunk`): their rows share the
   matrix products, attention runs per sequence. How many prompt tokens a step takes is the
   `PrefillBudget`'s call: at most `prefill_tokens`, and while streams are decoding no more than keeps
   the step under `max_gap` times a decode step (measured as the steps run - a prompt token's cost
   grows with its position, so near the end of an 8k prompt a step may take one). A long prompt is
   thus prefilled a chunk a step while the running streams get a token every step, their gap
   bounded; a prompt's last chunk samples its first token. With the C kernels a row's result does not depend on the other rows
   of the step (each row is summed in a fixed order), so a request's logits are bit-identical to
   the CLI's single-sequence run (tests/test_server_scheduler.py); numpy's BLAS
   (LLORCH_KERNELS=numpy) may round differently for another number of rows.

A failure confined to one sequence (its sampler, a NaN in its logits) ends that job alone with
`error` INFERENCE_FAILED (Engine.step); only an exception from the step itself (the forward pass)
ends every job of that step.

Memory (budget.py): with a `MemoryBudget`, a waiting job is admitted only while the KV caches of the active
jobs plus its own fit the budget (first come, first admitted); its cache is allocated then, and freed when it
ends. A job whose cache cannot fit even alone is refused at `submit` (TooLarge).

Backpressure: `max_queue` bounds the jobs waiting for a batch slot — accepted jobs beyond the
free slots (`max_batch` minus the active jobs, and no more than the memory budget has room for, in
order), whether or not the engine thread has moved them from the inbox yet. A submit past that bound raises QueueFull (the HTTP side answers 503).

Requests that arrive together thus start decoding together, and no prefill stops the others.

Events go back to the asyncio side with `loop.call_soon_threadsafe`, one list per job per
step, as soon as the step returns: a token is on the wire one step after it was sampled,
never collected first. The event loop never waits on this thread.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from llorch_cpud.engine import EndEvent, Engine, ErrorEvent, Sequence, TokenEvent
from llorch_cpud.server.budget import MemoryBudget, TooLarge
from llorch_cpud.server.logs import log, now_iso
from llorch_cpud.server.metrics import Metrics


class QueueFull(Exception):
    pass


class NotAccepting(Exception):
    pass


@dataclass(eq=False)
class Job:
    job_id: str
    seq: Sequence
    endpoint: str  # execute | completions | chat_completions
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of events
    correlation_id: str | None = None
    started_at: str = field(default_factory=now_iso)
    cancel_reason: str | None = None  # cancel | disconnect | shutdown
    terminal: bool = False  # set on the loop thread once the terminal event is queued
    admitted: bool = False
    prefilled: bool = False
    max_seconds: float | None = None  # wall time from acceptance after which the job ends with error TIMEOUT
    accepted_at: float = field(default_factory=time.monotonic)
    cache_bytes: int = 0  # the KV cache it takes once admitted (Scheduler.submit; KVCache.nbytes)
    echo_text: str = ""  # /v1/completions with echo: the prompt's text as returned

    @property
    def deadline(self) -> float | None:
        return None if self.max_seconds is None else self.accepted_at + self.max_seconds

    def cancel(self, reason: str) -> None:
        """Ask the engine thread to end this job (any thread). It ends within one step."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.seq.cancelled.set()

    @property
    def outcome(self) -> str:
        end = self.seq.end
        if end is None:
            return "timeout" if self.seq.error is not None and self.seq.error.code == "TIMEOUT" else "error"
        if end.stop_reason == "cancelled":
            return {"disconnect": "disconnected", "shutdown": "shutdown"}.get(self.cancel_reason or "", "cancelled")
        return end.stop_reason


class PrefillBudget:
    """Prompt tokens the next step prefills: `max_tokens` when no stream is decoding; beside decoding streams,
    as many as keep the step under `max_gap` x a decode step, at least one.

    Both costs are measured, not assumed: `decode_s` is the median of the last `window` steps without a prompt
    chunk (a median, so that the few steps slowed when a request arrives - its tokenising holds the GIL - do not
    set the bound), `token_s` the moving average of (step time - decode_s) / prompt tokens over mixed steps. A prompt token costs more the
    later its position (attention reads every cached position), so `token_s` follows the prompt as it grows;
    until both are known a mixed step takes `first_chunk` tokens."""

    def __init__(self, max_tokens: int = 512, max_gap: float = 1.5, first_chunk: int = 1, alpha: float = 0.5,
                 window: int = 32):
        self.max_tokens, self.max_gap = max(1, max_tokens), max_gap
        self.first_chunk, self.alpha = first_chunk, alpha
        self.decode_steps: deque[float] = deque(maxlen=window)
        self.token_s: float | None = None

    @property
    def decode_s(self) -> float | None:
        return statistics.median(self.decode_steps) if self.decode_steps else None

    def tokens(self, decoding: bool) -> int:
        if not decoding:
            return self.max_tokens
        if self.decode_s is None or self.token_s is None:
            return min(self.first_chunk, self.max_tokens)
        spare = (self.max_gap - 1.0) * self.decode_s
        return max(1, min(self.max_tokens, int(spare / max(self.token_s, 1e-9))))

    def record(self, dt: float, decoding: bool, prompt_tokens: int) -> None:
        decode_s = self.decode_s
        if not prompt_tokens:
            self.decode_steps.append(dt)
        elif decoding and decode_s is not None:
            t = max(0.0, dt - decode_s) / prompt_tokens
            self.token_s = t if self.token_s is None else self.token_s + self.alpha * (t - self.token_s)


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, max_batch: int = 16, max_queue: int = 256,
                 on_terminal=None, prefill_tokens: int = 512, max_gap: float = 1.5,
                 budget: MemoryBudget | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.prefill = PrefillBudget(prefill_tokens, max_gap)  # prompt tokens a step prefills
        self.max_queue = max_queue
        self.budget = budget  # None: no memory limit but max_batch
        self.cache_bytes = 0  # KV cache bytes of the active jobs (engine thread writes)
        self.cache_bytes_peak = 0  # the most the active jobs' caches ever held together (their KVCache.nbytes)
        self.on_terminal = on_terminal  # called on the loop thread when a job's terminal event is queued
        self.cond = threading.Condition()
        self.inbox: deque[Job] = deque()
        self.waiting: deque[Job] = deque()  # engine thread only
        self.active: list[Job] = []  # engine thread only
        self.accepting = True
        self._cancel_all: str | None = None
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="llorch-engine", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if not self.accepting:
                raise NotAccepting()
            if self.budget is not None:
                job.cache_bytes = self.budget.cache_bytes(job.seq.max_seq)
                if job.cache_bytes > self.budget.cache_room:
                    raise TooLarge(job.seq.max_seq)
            if self.queued >= self.max_queue:
                raise QueueFull()
            self.inbox.append(job)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def cancel_all(self, reason: str) -> None:
        """Stop accepting; end every queued and active job (terminal event `end`, stop_reason cancelled)."""
        with self.cond:
            self.accepting = False
            self._cancel_all = reason
            self.cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        self.cancel_all("shutdown")
        with self.cond:
            self._stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def queued(self) -> int:
        """Accepted jobs waiting for a batch slot: those beyond the free slots (read from any thread; the
        engine thread pops a job from `waiting` before appending it to `active`, so this never over-counts)."""
        free = max(0, self.max_batch - len(self.active))
        if self.budget is None:
            return max(0, len(self.inbox) + len(self.waiting) - free)
        lined = [*self.waiting, *self.inbox]  # in the order they will be admitted
        room, fit = self.budget.cache_room - self.cache_bytes, 0
        for job in lined[:free]:
            if job.cache_bytes > room:
                break
            room -= job.cache_bytes
            fit += 1
        return len(lined) - fit

    @property
    def running(self) -> int:
        return len(self.active)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        log("engine thread started", max_batch=self.max_batch)
        while True:
            with self.cond:
                while not (self.inbox or self.waiting or self.active or self._stopping or self._cancel_all):
                    self.cond.wait()
                self.waiting.extend(self.inbox)
                self.inbox.clear()
                cancel_all, self._cancel_all = self._cancel_all, None
                stopping = self._stopping
            if cancel_all:
                for job in [*self.waiting, *self.active]:
                    job.cancel(cancel_all)
            self._reap_cancelled()
            self._expire()
            if stopping and not (self.waiting or self.active):
                break
            try:
                self._iterate()
            except Exception as e:  # never let the engine thread die
                log("engine loop error", level=40, error=f"{type(e).__name__}: {e}")
                time.sleep(0.01)
        log("engine thread stopped")

    def _iterate(self) -> None:
        while self.waiting and len(self.active) < self.max_batch and self._fits(self.waiting[0]):
            job = self.waiting.popleft()
            job.admitted = True
            job.seq.t_start = time.perf_counter()  # prefill time excludes time spent queued
            self.active.append(job)
            self._hold_cache(job)
        decoding = [j for j in self.active if j.prefilled]
        new, budget = [], self.prefill.tokens(bool(decoding))
        n_prompt = 0
        for j in self.active:
            if not j.prefilled and n_prompt < budget:
                j.seq.chunk = min(budget - n_prompt, len(j.seq.pending))
                n_prompt += j.seq.chunk
                new.append(j)
        if not (new or decoding):
            return
        t0 = time.perf_counter()
        self._step(decoding + new)
        dt = time.perf_counter() - t0
        self.prefill.record(dt, bool(decoding), n_prompt)
        if new:
            self.metrics.prefill_step(n_prompt, dt)
        else:
            self.metrics.decode_step(len(decoding), dt)
        for j in new:
            if j.seq.generated or j.seq.done:  # its last chunk went in: its first token is out (or it ended)
                j.prefilled = True
                j.seq.chunk = None
                if j.seq.t_first is not None:
                    self.metrics.first_token(j.seq.t_first - j.seq.t_start)
                log("prefill", job_id=j.job_id, correlation_id=j.correlation_id, prompt_tokens=len(j.seq.prompt_ids),
                    prefill_ms=round((time.perf_counter() - j.seq.t_start) * 1000, 1), batch=len(self.active))

    def _fits(self, job: Job) -> bool:
        return self.budget is None or self.cache_bytes + job.cache_bytes <= self.budget.cache_room

    def _hold_cache(self, job: Job) -> None:
        """An admitted job's KV cache: allocated now, counted until the job leaves `active`."""
        job.seq.allocate_cache()
        if self.budget is None and job.seq.cache is not None:
            job.cache_bytes = job.seq.cache.nbytes
        self.cache_bytes += job.cache_bytes
        held = sum(j.seq.cache.nbytes for j in self.active if j.seq.cache is not None)
        self.cache_bytes_peak = max(self.cache_bytes_peak, held)

    def _step(self, jobs: list[Job]) -> None:
        before = [len(j.seq.generated) for j in jobs]
        try:
            results = self.engine.step([j.seq for j in jobs])
        except Exception as e:
            log("inference failed", level=40, error=f"{type(e).__name__}: {e}", job_ids=[j.job_id for j in jobs])
            for j in jobs:
                j.seq.cancel_now()  # frees the cache
                self._deliver(j, [("error", {"code": "INFERENCE_FAILED", "message": f"{type(e).__name__}: {e}"})])
                self._remove(j)
            return
        self.metrics.tokens(sum(len(j.seq.generated) - b for j, b in zip(jobs, before)))
        for j, events in zip(jobs, results):
            if events:
                self._deliver(j, [self._wrap(e) for e in events])
            if j.seq.done:
                self._remove(j)

    def _reap_cancelled(self) -> None:
        for line in (self.waiting, self.active):
            for job in [j for j in line if j.seq.cancelled.is_set() or j.seq.done]:
                events = job.seq.cancel_now()
                if events:
                    self._deliver(job, [self._wrap(e) for e in events])
                self._remove(job)

    def _expire(self) -> None:
        now = time.monotonic()
        for line in (self.waiting, self.active):
            for job in [j for j in line if j.deadline is not None and now > j.deadline]:
                events = job.seq.fail("TIMEOUT", "the request ran past the worker's maximum time per request "
                                                 f"({job.max_seconds:g} s)")
                if events:
                    self._deliver(job, [self._wrap(e) for e in events])
                self._remove(job)

    def _remove(self, job: Job) -> None:
        if job in self.active:
            self.active.remove(job)
            self.cache_bytes -= job.cache_bytes
        elif job in self.waiting:
            self.waiting.remove(job)
        end = job.seq.end
        self.metrics.request(job.endpoint, job.outcome)
        fields = dict(job_id=job.job_id, correlation_id=job.correlation_id, endpoint=job.endpoint, outcome=job.outcome)
        if job.seq.error is not None:
            fields.update(error_code=job.seq.error.code, error=job.seq.error.message)
        if end is not None:
            fields.update(stop_reason=end.stop_reason, tokens_out=end.tokens_out, prompt_tokens=len(end.prompt_ids),
                          prefill_ms=round(end.prefill_time_ms, 1), decode_ms=round(end.decode_time_ms, 1),
                          decode_tokens_per_sec=round(end.decode_tokens_per_sec, 2), seed=end.seed)
        log("job finished", **fields)

    @staticmethod
    def _wrap(e):
        if isinstance(e, TokenEvent):
            return ("token", e)
        if isinstance(e, EndEvent):
            return ("end", e)
        if isinstance(e, ErrorEvent):
            return ("error", {"code": e.code, "message": e.message})
        return ("error", e)

    def _deliver(self, job: Job, events: list) -> None:
        try:
            job.loop.call_soon_threadsafe(self._put, job, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _put(self, job: Job, events: list) -> None:  # loop thread
        if job.terminal:
            return
        job.queue.put_nowait(events)
        if any(kind in ("end", "error") for kind, _ in events):
            job.terminal = True
            if self.on_terminal is not None:
                self.on_terminal(job)
