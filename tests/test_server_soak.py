"""A bounded soak of the worker (issue 15): a real `serve` of the default model (SmolLM2-135M-Instruct) on
loopback, 16 concurrent streams a round over ROUNDS rounds.

Each round's 16 streams mix /execute, /v1/completions and /v1/chat/completions; greedy, temperature with
top_p/top_k, repetition penalties and min_p, stop strings; two clients disconnect after a few tokens and two
jobs are cancelled through POST /cancel (their streams then read to the end). Asserted:
- every stream read to the end has exactly one terminal event, the last one (/execute: `end` or `error`;
  OpenAI: one chunk with a finish_reason, then [DONE]), and no response or log line has a 5xx;
- after every round the worker is idle again: no active or queued job, no KV cache held;
- the server's RSS after each later round stays within RSS_BOUND_MIB (16 MiB) of its RSS after the first
  round (the caches, sampler state and streams of the ended jobs are freed: no growth from round to round).
  The server runs with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so that a freed KV
  cache leaves the RSS: by default glibc raises the threshold to the size of the first big block freed and
  keeps later caches in its heap, where freed ones stay resident - a plateau (measured: ~25-30 MiB over the
  first round, from the second round on, flat after) that says nothing either way; a leaked cache stays
  resident under either setting. Measured with the fixed threshold over 10 rounds: within 8 MiB, no trend;
- greedy texts are identical in every round and to the same requests run one at a time on the same server
  afterwards; seeded sampled texts are identical in every round.
`--prefill-tokens 1024` makes a round's prompts go in whole in one step, as each does alone (a prompt split
into other chunks would attend in another summation order: the same tokens only up to float rounding).
Loops are bounded: at most ROUNDS rounds (no round starts after SOAK_BUDGET_S, at least 3 run), each client
gives up after ROUND_TIMEOUT_S.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_server import Worker, sse

pytestmark = pytest.mark.slow

ROUNDS = 6
STREAMS = 16
ROUND_TIMEOUT_S = 40
SOAK_BUDGET_S = 75  # no round starts past this (at least 3 rounds run)
RSS_BOUND_MIB = 16
MMAP_THRESHOLD = 1 << 20  # the server's glibc: blocks from 1 MiB (every KV cache here) mmapped, unmapped when freed
FIGURES: dict = {}

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "List three colors:",
           "Once upon a time", "The three laws of robotics are", "Explain gravity in one sentence.", "1, 2, 3, 4,"]
BASE = {"max_tokens": 24}
# (kind, request) where kind: greedy (compared with its sequential run), seeded (compared across rounds),
# disconnect (the client leaves after 3 tokens), cancel (POST /cancel after 2 tokens, then read to the end)
SPECS = [
    ("greedy", {"route": "execute", "prompt": PROMPTS[0], "temperature": 0.0}),
    ("greedy", {"route": "execute", "prompt": PROMPTS[1], "temperature": 0.0}),
    ("greedy", {"route": "execute", "prompt": PROMPTS[2], "temperature": 0.0, "max_tokens": 40}),
    ("greedy", {"route": "execute", "prompt": PROMPTS[3], "temperature": 0.0, "stop": ["\n", "."]}),
    ("greedy", {"route": "execute", "prompt": PROMPTS[4], "temperature": 0.0, "repetition_penalty": 1.3}),
    ("greedy", {"route": "completions", "prompt": PROMPTS[5], "temperature": 0.0}),
    ("greedy", {"route": "chat", "prompt": PROMPTS[6], "temperature": 0.0}),
    ("seeded", {"route": "execute", "prompt": PROMPTS[0], "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 7}),
    ("seeded", {"route": "execute", "prompt": PROMPTS[1], "temperature": 1.2, "top_k": 5, "seed": 8}),
    ("seeded", {"route": "execute", "prompt": PROMPTS[7], "temperature": 0.7, "repetition_penalty": 1.2,
                "min_p": 0.05, "seed": 9, "stop": [","]}),
    ("seeded", {"route": "completions", "prompt": PROMPTS[4], "temperature": 0.9, "top_p": 0.8, "seed": 10}),
    ("seeded", {"route": "chat", "prompt": PROMPTS[3], "temperature": 0.6, "top_k": 20, "seed": 11}),
    ("disconnect", {"route": "execute", "prompt": PROMPTS[4], "temperature": 0.0, "max_tokens": 200}),
    ("disconnect", {"route": "completions", "prompt": PROMPTS[5], "temperature": 1.0, "max_tokens": 200, "seed": 1}),
    ("cancel", {"route": "execute", "prompt": PROMPTS[6], "temperature": 0.0, "max_tokens": 200}),
    ("cancel", {"route": "execute", "prompt": PROMPTS[7], "temperature": 1.0, "max_tokens": 200, "seed": 2}),
]
assert len(SPECS) == STREAMS


@pytest.fixture(scope="module")
def worker(smollm2_gguf, tmp_path_factory):
    w = Worker(smollm2_gguf, tmp_path_factory.mktemp("soak"), "--max-batch", str(STREAMS), "--prefill-tokens", "1024")
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # Worker.start passes os.environ on
    try:
        w.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    yield w
    w.stop()


def rss_bytes(w) -> int:
    status = Path(f"/proc/{w.proc.pid}/status").read_text()
    return next(int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmRSS:"))


def request_of(spec: dict, job_id: str) -> tuple[str, dict]:
    body = {**BASE, **{k: v for k, v in spec.items() if k not in ("route", "prompt")}}
    if spec["route"] == "execute":
        return "/execute", {"job_id": job_id, "prompt": spec["prompt"], **body}
    if spec["route"] == "completions":
        return "/v1/completions", {"prompt": spec["prompt"], "stream": True, **body}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": spec["prompt"]}], "stream": True, **body}


def run_stream(base: str, kind: str, spec: dict, job_id: str) -> dict:
    """One client: POST, read the SSE stream (leaving or cancelling as `kind` says). Returns what it saw."""
    path, body = request_of(spec, job_id)
    out = {"kind": kind, "status": None, "events": [], "cancel_status": None, "read_to_end": False}
    with httpx.Client(timeout=ROUND_TIMEOUT_S) as c, c.stream("POST", base + path, json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["body"] = r.read().decode(errors="replace")
            return out
        job = r.headers["x-job-id"]
        tokens = 0
        for ev, data in sse(r):
            out["events"].append((ev, data))
            if ev == "token" or (ev == "message" and data != "[DONE]" and json.loads(data)["choices"]
                                 and json.loads(data)["choices"][0].get("finish_reason") is None):
                tokens += 1
            if kind == "disconnect" and tokens >= 3:
                return out  # leaves mid-stream: the connection closes here
            if kind == "cancel" and tokens == 2 and out["cancel_status"] is None:
                out["cancel_status"] = c.post(base + "/cancel", json={"job_id": job}).status_code
        out["read_to_end"] = True
    return out


def terminal_and_text(res: dict) -> tuple[list[str], str, str | None]:
    """(terminal events in order of arrival, text, stop reason) of a stream read to the end; for OpenAI streams
    the terminals are the chunks with a finish_reason, an error chunk, and [DONE]."""
    terminals, pieces, reason = [], [], None
    for ev, data in res["events"]:
        if ev in ("end", "error"):
            terminals.append(ev)
            reason = json.loads(data).get("stop_reason") if ev == "end" else "error"
        elif ev == "token":
            pieces.append(json.loads(data)["t"])
        elif ev == "message":
            if data == "[DONE]":
                terminals.append("[DONE]")
                continue
            d = json.loads(data)
            if "error" in d:
                terminals.append("error")
                continue
            for ch in d["choices"]:
                pieces.append(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
                if ch.get("finish_reason") is not None:
                    terminals.append("finish")
                    reason = ch.get("llorch_stop_reason")
    return terminals, "".join(pieces), reason


def check_terminal(res: dict) -> None:
    terminals, _, reason = terminal_and_text(res)
    last = res["events"][-1][0] if res["events"] else None
    if res["events"][0][0] == "started":  # /execute
        assert terminals in (["end"], ["error"]) and last == terminals[0], res["events"][-3:]
    else:
        assert terminals == ["finish", "[DONE]"] and res["events"][-1][1] == "[DONE]", res["events"][-3:]
    if res["kind"] == "cancel":
        assert res["cancel_status"] == 200 and reason == "cancelled", (res["cancel_status"], reason)


def wait_idle(w, timeout=20) -> dict:
    t0 = time.perf_counter()
    while True:
        h = httpx.get(f"{w.base}/health", timeout=10).json()
        if (h["active_jobs"], h["queued_jobs"], h["kv_cache_bytes"]) == (0, 0, 0) or time.perf_counter() - t0 > timeout:
            return h
        time.sleep(0.05)


def test_soak_sixteen_streams_a_round(worker):
    t_start = time.perf_counter()
    texts: dict[int, list[str]] = {i: [] for i in range(STREAMS)}
    rss, round_s, counts = [], [], {"streams": 0, "read_to_end": 0, "disconnected": 0, "cancelled": 0}
    for rnd in range(ROUNDS):
        if rnd >= 2 and time.perf_counter() - t_start > SOAK_BUDGET_S:
            break
        t0 = time.perf_counter()
        results: list = [None] * STREAMS
        barrier = threading.Barrier(STREAMS)

        def client(i, rnd=rnd):
            kind, spec = SPECS[i]
            barrier.wait()
            results[i] = run_stream(worker.base, kind, spec, f"soak-r{rnd}-{i}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ROUND_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in threads), f"round {rnd}: a client is still reading"
        for i, res in enumerate(results):
            assert res["status"] == 200, (rnd, i, res["status"], res.get("body"))
            counts["streams"] += 1
            if not res["read_to_end"]:
                assert res["kind"] == "disconnect", (rnd, i)
                counts["disconnected"] += 1
                continue
            counts["read_to_end"] += 1
            counts["cancelled"] += res["kind"] == "cancel"
            check_terminal(res)
            texts[i].append(terminal_and_text(res)[1])
        h = wait_idle(worker)
        assert (h["active_jobs"], h["queued_jobs"], h["kv_cache_bytes"]) == (0, 0, 0), h
        rss.append(rss_bytes(worker))
        round_s.append(round(time.perf_counter() - t0, 2))

    # greedy: the same in every round and as the same request alone (one at a time, on the same server)
    sequential = {}
    for i, (kind, spec) in enumerate(SPECS):
        if kind == "greedy":
            res = run_stream(worker.base, "greedy", spec, f"soak-seq-{i}")
            check_terminal(res)
            sequential[i] = terminal_and_text(res)[1]
            assert sequential[i], (i, res["events"][-3:])
            assert texts[i] == [sequential[i]] * len(texts[i]), (i, spec, texts[i], sequential[i])
        elif kind == "seeded":
            assert texts[i] == [texts[i][0]] * len(texts[i]), (i, spec, texts[i])

    lines = [json.loads(x) for x in worker.log_lines()]
    lines = lines[next(i for i, x in enumerate(lines) if x["msg"] == "ready"):]  # (Worker.start probes while loading)
    statuses = [x["status"] for x in lines if x["msg"] == "request"]
    outcomes = [x["outcome"] for x in lines if x["msg"] == "job finished" and str(x.get("job_id", "")).startswith("soak-r")]
    FIGURES["soak"] = {"rounds": len(rss), "round_s": round_s, "rss_mib": [round(r / 2**20, 1) for r in rss],
                       "rss_growth_mib": round((max(rss[1:]) - rss[0]) / 2**20, 2), **counts,
                       "requests_logged": len(statuses), "total_s": round(time.perf_counter() - t_start, 1)}
    assert len(rss) >= 3
    assert not [s for s in statuses if s >= 500]
    assert not [x for x in lines if x["level"] == "error"]
    assert outcomes.count("disconnected") == 1 * len(rss)  # /execute's disconnecting client (OpenAI ids are cmpl-)
    assert max(rss[1:]) - rss[0] <= RSS_BOUND_MIB * 2**20, FIGURES["soak"]
