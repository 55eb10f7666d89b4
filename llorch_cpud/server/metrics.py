"""Prometheus text exposition (format 0.0.4), written by hand: a handful of counters, gauges, one histogram.

Written from the engine thread (steps, tokens, outcomes) and the event loop (rejections);
one lock guards it all. `render()` is called by `GET /metrics`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(d: dict) -> str:
    if not d:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in d.items()) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter = Counter()  # (endpoint, outcome) -> count
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.prefill = {"steps": 0, "seconds": 0.0, "tokens": 0}
        self.decode = {"steps": 0, "seconds": 0.0, "tokens": 0, "rows_max": 0}
        self._window: deque = deque()  # (time, tokens, seconds) of recent decode steps
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_n = 0
        # live gauges, read at render time
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    # ------------------------------------------------------------------ recording

    def request(self, endpoint: str, outcome: str) -> None:
        with self.lock:
            self.requests[(endpoint, outcome)] += 1

    def prefill_step(self, tokens: int, seconds: float) -> None:
        with self.lock:
            self.prefill["steps"] += 1
            self.prefill["seconds"] += seconds
            self.prefill["tokens"] += tokens
            self.prompt_tokens += tokens

    def decode_step(self, rows: int, seconds: float) -> None:
        now = time.monotonic()
        with self.lock:
            d = self.decode
            d["steps"] += 1
            d["seconds"] += seconds
            d["tokens"] += rows
            d["rows_max"] = max(d["rows_max"], rows)
            self._window.append((now, rows, seconds))
            while self._window and self._window[0][0] < now - RATE_WINDOW_S:
                self._window.popleft()

    def tokens(self, n: int) -> None:
        with self.lock:
            self.tokens_generated += n

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            self.ttft_n += 1
            for i, b in enumerate(TTFT_BUCKETS):
                if seconds <= b:
                    self.ttft_counts[i] += 1

    def decode_tokens_per_sec(self) -> float:
        """Tokens produced per second of decode-step time over the last RATE_WINDOW_S seconds (0 when idle)."""
        now = time.monotonic()
        with self.lock:
            recent = [(n, s) for t, n, s in self._window if t >= now - RATE_WINDOW_S]
        secs = sum(s for _, s in recent)
        return sum(n for n, _ in recent) / secs if secs > 0 else 0.0

    # ------------------------------------------------------------------ exposition

    def render(self) -> str:
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value, *suffix in samples:
                lines.append(f"{name}{suffix[0] if suffix else ''}{_labels(labels)} {_num(value)}")

        tps = self.decode_tokens_per_sec()
        with self.lock:
            reqs = sorted(self.requests.items())
            metric("llorch_requests_total", "counter", "Generation requests by endpoint and outcome.",
                   [({"endpoint": e, "outcome": o}, n) for (e, o), n in reqs])
            metric("llorch_tokens_generated_total", "counter", "Tokens generated (all requests).",
                   [({}, self.tokens_generated)])
            metric("llorch_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, self.prompt_tokens)])
            metric("llorch_prefill_seconds_total", "counter", "Wall time spent in prefill steps.",
                   [({}, float(self.prefill["seconds"]))])
            metric("llorch_decode_steps_total", "counter", "Batched decode steps run.", [({}, self.decode["steps"])])
            metric("llorch_decode_seconds_total", "counter", "Wall time spent in batched decode steps.",
                   [({}, float(self.decode["seconds"]))])
            metric("llorch_decode_tokens_total", "counter", "Tokens produced by batched decode steps.",
                   [({}, self.decode["tokens"])])
            metric("llorch_decode_batch_rows_max", "gauge", "Largest number of sequences decoded in one step.",
                   [({}, self.decode["rows_max"])])
            cum = []
            for b, c in zip(TTFT_BUCKETS, self.ttft_counts):
                cum.append(({"le": _num(float(b))}, c, "_bucket"))
            cum.append(({"le": "+Inf"}, self.ttft_n, "_bucket"))
            cum.append(({}, float(self.ttft_sum), "_sum"))
            cum.append(({}, self.ttft_n, "_count"))
            metric("llorch_time_to_first_token_seconds", "histogram", "Time from admission to the first token.", cum)
        metric("llorch_decode_tokens_per_second", "gauge",
               f"Decode throughput (tokens per second of decode-step time) over the last {RATE_WINDOW_S:g} s.",
               [({}, float(round(tps, 3)))])
        for name, (help_, fn) in sorted(self.gauges.items()):
            metric(name, "gauge", help_, [({}, fn())])
        metric("llorch_uptime_seconds", "gauge", "Seconds since the process started serving.",
               [({}, float(round(time.time() - self.started, 3)))])
        return "\n".join(lines) + "\n"
