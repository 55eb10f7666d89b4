"""Prometheus metrics through `prometheus_client`: counters, gauges, one histogram, in a registry of our own.

Every `Metrics` (one per server) has its own `CollectorRegistry`, not the library's global
one, so several apps in one process (the tests) never collide. Written from the engine
thread (steps, tokens, outcomes) and the event loop (rejections); prometheus_client's
instruments are thread-safe, and a lock guards what we keep beside them (the recent
decode steps behind the throughput gauge, the largest batch). `GET /metrics` returns
`render()` with `CONTENT_TYPE` (prometheus_client's text format).

Exposed names (prometheus_client appends `_total` to a counter's name in the text format,
so the counters are declared without it):

    llorch_requests_total{endpoint,outcome}   counter    generation requests by endpoint and outcome
    llorch_tokens_generated_total             counter    tokens generated (all requests)
    llorch_prompt_tokens_total                counter    prompt tokens prefilled
    llorch_prefill_steps_total                counter    steps that prefilled prompt tokens
    llorch_prefill_seconds_total              counter    wall time of those steps
    llorch_decode_steps_total                 counter    batched decode steps
    llorch_decode_seconds_total               counter    wall time of batched decode steps
    llorch_decode_tokens_total                counter    tokens produced by batched decode steps
    llorch_decode_batch_rows_max              gauge      most sequences decoded in one step
    llorch_time_to_first_token_seconds        histogram  admission to first token
    llorch_decode_tokens_per_second           gauge      decode throughput over the last RATE_WINDOW_S
    llorch_uptime_seconds                     gauge      seconds since the process started serving
    + the gauges the runner adds once the model is loaded (`gauge()`): llorch_queue_depth,
      llorch_active_jobs, llorch_memory_bytes, llorch_model_loaded.

prometheus_client would also write a `<name>_created` gauge beside every counter and histogram
series (its creation time, meaningful in OpenMetrics, a plain gauge in this text format);
`render()` leaves those out, without touching the library's process-wide switch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.lock = threading.Lock()
        self.started = time.time()
        self._window: deque = deque()  # (time, tokens, seconds) of recent decode steps
        self._rows_max = 0
        self._gauges: dict[str, Gauge] = {}  # the read-at-scrape gauges, by name
        r = self.registry
        self._requests = Counter("llorch_requests", "Generation requests by endpoint and outcome.",
                                 ["endpoint", "outcome"], registry=r)
        self._tokens = Counter("llorch_tokens_generated", "Tokens generated (all requests).", registry=r)
        self._prompt_tokens = Counter("llorch_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self._prefill_steps = Counter("llorch_prefill_steps", "Steps that prefilled prompt tokens.", registry=r)
        self._prefill_seconds = Counter("llorch_prefill_seconds", "Wall time spent in prefill steps.", registry=r)
        self._decode_steps = Counter("llorch_decode_steps", "Batched decode steps run.", registry=r)
        self._decode_seconds = Counter("llorch_decode_seconds", "Wall time spent in batched decode steps.", registry=r)
        self._decode_tokens = Counter("llorch_decode_tokens", "Tokens produced by batched decode steps.", registry=r)
        self._rows_gauge = Gauge("llorch_decode_batch_rows_max", "Largest number of sequences decoded in one step.",
                                 registry=r)
        self._ttft = Histogram("llorch_time_to_first_token_seconds", "Time from admission to the first token.",
                               buckets=TTFT_BUCKETS, registry=r)
        self.gauge("llorch_decode_tokens_per_second",
                   f"Decode throughput (tokens per second of decode-step time) over the last {RATE_WINDOW_S:g} s.",
                   lambda: round(self.decode_tokens_per_sec(), 3))
        self.gauge("llorch_uptime_seconds", "Seconds since the process started serving.",
                   lambda: round(time.time() - self.started, 3))

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        """A gauge read when /metrics is scraped (queue depth, memory, ...); a second call with the same name
        replaces the first."""
        with self.lock:
            old = self._gauges.pop(name, None)
            if old is not None:
                self.registry.unregister(old)
            g = self._gauges[name] = Gauge(name, help_, registry=self.registry)
        g.set_function(fn)

    # ------------------------------------------------------------------ recording

    def request(self, endpoint: str, outcome: str) -> None:
        self._requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def prefill_step(self, tokens: int, seconds: float) -> None:
        self._prefill_steps.inc()
        self._prefill_seconds.inc(seconds)
        self._prompt_tokens.inc(tokens)

    def decode_step(self, rows: int, seconds: float) -> None:
        now = time.monotonic()
        self._decode_steps.inc()
        self._decode_seconds.inc(seconds)
        self._decode_tokens.inc(rows)
        with self.lock:
            if rows > self._rows_max:
                self._rows_max = rows
                self._rows_gauge.set(rows)
            self._window.append((now, rows, seconds))
            while self._window and self._window[0][0] < now - RATE_WINDOW_S:
                self._window.popleft()

    def tokens(self, n: int) -> None:
        self._tokens.inc(n)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def decode_tokens_per_sec(self) -> float:
        """Tokens produced per second of decode-step time over the last RATE_WINDOW_S seconds (0 when idle)."""
        now = time.monotonic()
        with self.lock:
            recent = [(n, s) for t, n, s in self._window if t >= now - RATE_WINDOW_S]
        secs = sum(s for _, s in recent)
        return sum(n for n, _ in recent) / secs if secs > 0 else 0.0

    # ------------------------------------------------------------------ reading

    def value(self, name: str, labels: dict | None = None) -> float:
        """One sample's current value by its exposed name (0 if it has none yet)."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    @property
    def tokens_generated(self) -> int:
        return int(self.value("llorch_tokens_generated_total"))

    @property
    def prompt_tokens(self) -> int:
        return int(self.value("llorch_prompt_tokens_total"))

    @property
    def prefill(self) -> dict:
        """A snapshot: {"steps", "seconds", "tokens"}."""
        return {"steps": int(self.value("llorch_prefill_steps_total")),
                "seconds": self.value("llorch_prefill_seconds_total"),
                "tokens": int(self.value("llorch_prompt_tokens_total"))}

    @property
    def decode(self) -> dict:
        """A snapshot: {"steps", "seconds", "tokens", "rows_max"}."""
        return {"steps": int(self.value("llorch_decode_steps_total")),
                "seconds": self.value("llorch_decode_seconds_total"),
                "tokens": int(self.value("llorch_decode_tokens_total")),
                "rows_max": int(self.value("llorch_decode_batch_rows_max"))}

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry's metric families without their `_created` samples (a collector for generate_latest)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():  # fresh objects on every collect
            family.samples = [s for s in family.samples if s.name != family.name + "_created"]
            yield family
