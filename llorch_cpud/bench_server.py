"""Concurrent streams through real servers: ours (`llorch-cpud serve`) and llama.cpp's `llama-server`.

For each concurrency level, N streaming clients start together with the same greedy request
(different prompts); we record per-stream time to first token and token counts, the
aggregate decode rate (tokens after each stream's first, over the wall time from the first
first-token to the last end - a window that includes the other streams' prefills), the
steady-state decode rate (tokens arriving while all N streams are decoding and none has ended:
the batched decode steps alone), and `/health` latency sampled throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from llorch_cpud.formats import resolve

# httpx is imported where it is used: this module loads with the CLI (bench registers its subcommand).

TOPICS = ["the ocean", "a city at night", "an old library", "mountain weather", "a train journey",
          "a chess match", "a kitchen garden", "the first computers", "a lighthouse", "a desert road"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(base: str, ok, timeout: float = 600) -> None:
    import httpx

    t = time.time()
    while time.time() - t < timeout:
        try:
            r = httpx.get(base + "/health", timeout=2)
            if ok(r):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base} did not become healthy in {timeout}s")


def prompt_text(i: int, n_words: int) -> str:
    words = (f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}. " * 64).split()
    return " ".join(words[:n_words])


def stream_ours(base: str, i: int, args, out: dict) -> None:
    import httpx

    body = {"job_id": f"bench-{time.time_ns()}-{i}", "prompt": prompt_text(i, args.prompt_tokens * 3 // 4),
            "max_tokens": args.new_tokens, "temperature": 0.0}
    t0 = time.perf_counter()
    first, n, event, times = None, 0, None, []
    with httpx.Client(timeout=None) as c, c.stream("POST", base + "/execute", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "token":
                n += 1
                times.append(time.perf_counter())
                first = first or times[-1]
    out.update(t0=t0, first=first or time.perf_counter(), end=time.perf_counter(), pieces=n, times=times)


def stream_llama_server(base: str, i: int, args, out: dict) -> None:
    import httpx

    body = {"prompt": prompt_text(i, args.prompt_tokens * 3 // 4), "n_predict": args.new_tokens, "temperature": 0.0,
            "stream": True, "cache_prompt": False}
    t0 = time.perf_counter()
    first, n, times = None, 0, []
    with httpx.Client(timeout=None) as c, c.stream("POST", base + "/completion", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                d = json.loads(line[5:])
                if d.get("content") or not d.get("stop"):
                    n += 1
                    times.append(time.perf_counter())
                    first = first or times[-1]
    out.update(t0=t0, first=first or time.perf_counter(), end=time.perf_counter(), pieces=n, times=times)


def run_level(base: str, streamer, n: int, args) -> dict:
    import httpx

    outs = [dict() for _ in range(n)]
    threads = [threading.Thread(target=streamer, args=(base, i, args, outs[i])) for i in range(n)]
    health, stop = [], threading.Event()

    def probe():
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get(base + "/health")
                health.append((time.perf_counter() - t) * 1000)
                time.sleep(0.05)

    p = threading.Thread(target=probe)
    p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    p.join()
    start = min(o["first"] for o in outs)
    end = max(o["end"] for o in outs)
    tokens = sum(max(o["pieces"] - 1, 0) for o in outs)
    # steady state: while every stream is past its first token and none has ended (no prefill of
    # another request in the window: the batched decode steps alone)
    s0, s1 = max(o["first"] for o in outs), min(o["end"] for o in outs)
    in_window = sum(1 for o in outs for t in o["times"] if s0 < t <= s1)
    steady = in_window / (s1 - s0) if s1 - s0 > 0.2 else None
    return {"streams": n, "aggregate_decode_tok_s": tokens / (end - start) if end > start else 0.0,
            "steady_decode_tok_s": steady,
            "per_stream_tok_s": statistics.median((o["pieces"] - 1) / (o["end"] - o["first"]) for o in outs if o["end"] > o["first"]),
            "ttft_ms_median": statistics.median((o["first"] - o["t0"]) * 1000 for o in outs),
            "health_ms_max": max(health) if health else None,
            "health_ms_median": statistics.median(health) if health else None,
            "tokens": [o["pieces"] for o in outs]}


def start_ours(model: str, numerics: str = "float32") -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llorch_cpud.cli", "serve", "--model", model, "--port", str(port),
                             "--numerics", numerics],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_health(base, lambda r: r.status_code == 200)
    return proc, base


def start_llama_server(binary: str, model: str, parallel: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([binary, "-m", model, "-t", str(os.cpu_count() or 2), "--parallel", str(parallel),
                             "-c", str(ctx * parallel), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_health(base, lambda r: r.status_code == 200)
    return proc, base


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """`[########------------] 3/8`: the bench's progress, one line per finished measurement."""
    filled = round(width * done / total) if total else width
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def per_round_ratio(a: list[dict], b: list[dict], key: str) -> float | None:
    """Median over rounds of a[i][key] / b[i][key] (runs of the same round were measured back to back)."""
    ratios = [x[key] / y[key] for x, y in zip(a, b) if x.get(key) and y.get(key)]
    return statistics.median(ratios) if ratios else None


def bench_concurrency(args, with_llama_server: bool) -> dict:
    model = str(resolve(args.model))
    levels = sorted(set(args.concurrency))
    numerics = getattr(args, "numerics", "float32")
    servers = {"ours": (lambda: start_ours(model, numerics), stream_ours)}
    if with_llama_server:
        binary = args.llama_server or os.environ.get("LLORCH_LLAMA_SERVER") or shutil.which("llama-server")
        if not binary or not Path(binary).exists():
            servers_skipped = {"llama-server": "binary not found (--llama-server PATH or $LLORCH_LLAMA_SERVER)"}
        elif not model.endswith(".gguf"):
            servers_skipped = {"llama-server": "needs a .gguf model"}
        else:
            servers_skipped = {}
            ctx = args.prompt_tokens + args.new_tokens + 64
            servers["llama-server"] = (lambda: start_llama_server(binary, model, max(levels), ctx), stream_llama_server)
    else:
        servers_skipped = {}
    results: dict = {"levels": levels, "servers": {}, "skipped": servers_skipped}
    # All servers up at once (an idle one uses no CPU) and the runs interleaved round by round -
    # ours x1, peer x1, ours x8, peer x8, then again - so a change in the machine's memory bandwidth
    # during the benchmark hits every server and level alike; ratios are medians of per-round ratios.
    procs: dict = {}
    runs: dict = {name: {n: [] for n in levels} for name in servers}
    total, done = args.repeats * len(levels) * len(servers), 0
    try:
        for name, (start, _) in servers.items():
            procs[name] = start()
        for _ in range(args.repeats):
            for n in levels:
                for name, (_, streamer) in servers.items():
                    r = run_level(procs[name][1], streamer, n, args)
                    runs[name][n].append(r)
                    done += 1
                    print(f"{progress_bar(done, total)} {name} x{n}: aggregate {r['aggregate_decode_tok_s']:.1f} tok/s, "
                          f"steady-state {r['steady_decode_tok_s'] or 0:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(timeout=60)
    for name, by_level in runs.items():
        summary = {}
        for n, rs in by_level.items():
            agg = [r["aggregate_decode_tok_s"] for r in rs]
            steady = [r["steady_decode_tok_s"] for r in rs if r["steady_decode_tok_s"]]
            summary[str(n)] = {"aggregate_decode_tok_s": statistics.median(agg), "min": min(agg), "max": max(agg),
                               "steady_decode_tok_s": statistics.median(steady) if steady else None,
                               "per_stream_tok_s": statistics.median(r["per_stream_tok_s"] for r in rs),
                               "ttft_ms": statistics.median(r["ttft_ms_median"] for r in rs),
                               "health_ms_max": max(r["health_ms_max"] or 0 for r in rs),
                               "runs": rs}
        if len(levels) > 1:
            lo, hi = by_level[levels[0]], by_level[levels[-1]]
            summary["scaling"] = per_round_ratio(hi, lo, "aggregate_decode_tok_s")
            summary["steady_scaling"] = per_round_ratio(hi, lo, "steady_decode_tok_s")
        results["servers"][name] = summary
    if "ours" in runs:
        for peer in runs:
            if peer != "ours":
                results["servers"]["ours"][f"vs_{peer}"] = {
                    str(n): per_round_ratio(runs["ours"][n], runs[peer][n], "aggregate_decode_tok_s") for n in levels}
    return results
