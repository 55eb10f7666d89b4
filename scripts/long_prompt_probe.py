"""A long prompt against a running stream, over HTTP, as a client sees it: `llorch-cpud serve` on loopback,
one greedy stream decoding, then a prompt of N tokens posted beside it.

    python scripts/long_prompt_probe.py [--model M] [--prompt-tokens 8000] [--] [serve options ...]

Prints the stream's usual gap between tokens (median of 40 before the long prompt), its gaps while the long
prompt is prefilled (median, p99, max, max / usual), the prefill's time to first token and rate, /health's
latency polled every 50 ms throughout (max), the server's peak RSS (VmHWM) before and after, and the time
SIGTERM takes to end it with the stream still open. The stream restarts when it reaches max_tokens; gaps are
taken between tokens of one stream only."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sse_events(resp):
    event = None
    for line in resp.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event:
            yield event, json.loads(line[5:])
            event = None


def long_text(model: str | None, n_tokens: int) -> tuple[str, int]:
    """Random numbers (about a token a character pair) until the model's tokenizer counts n_tokens."""
    from llorch_cpud.formats import load_tokenizer, resolve

    tok = load_tokenizer(str(resolve(model)))
    rng = np.random.default_rng(0)
    words = [str(x) for x in rng.integers(0, 10, 40000)]
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose text is at most n_tokens tokens
        mid = (lo + hi + 1) // 2
        if len(tok.encode(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    return text, len(tok.encode(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=8000)
    ap.add_argument("serve_args", nargs="*")
    a = ap.parse_args()
    text, n = long_text(a.model, a.prompt_tokens)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llorch_cpud.cli", "serve", "--port", str(port), *a.serve_args]
    if a.model:
        cmd += ["--model", a.model]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        rss_before = vm_hwm_mb(proc.pid)
        stamps: list[list[float]] = []  # per stream, token arrival times
        stop = threading.Event()

        def streamer():
            k = 0
            while not stop.is_set():
                times: list[float] = []
                stamps.append(times)
                body = {"job_id": f"s{k}", "prompt": "Once upon a time", "max_tokens": 2048, "temperature": 0}
                try:
                    with httpx.Client(timeout=600) as c, c.stream("POST", f"{base}/execute", json=body) as r:
                        for ev, _ in sse_events(r):
                            if ev == "token":
                                times.append(time.perf_counter())
                except httpx.HTTPError:
                    return  # the server went down (SIGTERM at the end)
                k += 1

        health: list[tuple[float, float]] = []

        def poller():
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        c.get(f"{base}/health")
                    except httpx.HTTPError:
                        return
                    health.append((t, time.perf_counter() - t))
                    time.sleep(0.05)

        threads = [threading.Thread(target=streamer, daemon=True), threading.Thread(target=poller, daemon=True)]
        for t in threads:
            t.start()
        while sum(len(s) for s in stamps) < 41:
            time.sleep(0.05)
        usual = statistics.median(np.diff(stamps[0][:41]))
        t0 = time.perf_counter()
        body = {"job_id": "long", "prompt": text, "max_tokens": 1, "temperature": 0}
        with httpx.Client(timeout=3600) as c, c.stream("POST", f"{base}/execute", json=body) as r:
            events = list(sse_events(r))
        t1 = time.perf_counter()
        pairs = [(a_, b) for s in stamps for a_, b in zip(s, s[1:]) if a_ >= t0 and b <= t1]
        gaps = [b - a_ for a_, b in pairs]
        worst = sorted(pairs, key=lambda p: p[0] - p[1])[:5]  # the longest gaps: when (s after the post) and how long
        h = [d for t, d in health if t0 <= t <= t1]
        rss_after = vm_hwm_mb(proc.pid)
        stop.set()  # the stream is still open: SIGTERM must end it
        ts = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        term = time.perf_counter() - ts
        print(json.dumps({
            "prompt_tokens": n, "long_prompt_events": [e for e, _ in events][-1:],
            "usual_gap_ms": round(usual * 1e3, 1), "gaps_during_prefill": len(gaps),
            "gap_median_ms": round(statistics.median(gaps) * 1e3, 1),
            "gap_p99_ms": round(float(np.percentile(gaps, 99)) * 1e3, 1), "gap_max_ms": round(max(gaps) * 1e3, 1),
            "gap_max_over_usual": round(max(gaps) / usual, 2),
            "longest_gaps_at_s_ms": [(round(a_ - t0, 2), round((b - a_) * 1e3, 1)) for a_, b in worst], "gap_p99_over_usual": round(float(np.percentile(gaps, 99)) / usual, 2),
            "ttft_s": round(t1 - t0, 1), "prefill_tok_s": round(n / (t1 - t0), 1),
            "health_polls": len(h), "health_max_ms": round(max(h) * 1e3, 1),
            "vm_hwm_mb_before": round(rss_before), "vm_hwm_mb_after": round(rss_after),
            "sigterm_exit_s": round(term, 2), "exit_code": proc.returncode}, indent=1))
    finally:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    main()
