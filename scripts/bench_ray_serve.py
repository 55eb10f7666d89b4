"""Aggregate tokens/s through the Ray Serve deployment with 1, then 2 replicas (docs/scale-out.md's figures).

    RAY_USAGE_STATS_ENABLED=0 python scripts/bench_ray_serve.py [--model PATH] [--streams 8] [--tokens 64] [--threads 1]

Local Ray on this machine, Serve's proxy on 127.0.0.1; each round: `--streams` concurrent greedy /execute streams of
`--tokens` tokens (after one warm-up round), aggregate = all tokens / wall time of the round.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import time

import httpx

PROMPTS = ["Hello.", "What is the answer to life, the universe, and everything?", "def fibonacci(n):",
           "Once upon a time", "The capital of France is", "Dear Alice,", "1 2 3 4 5 6", "The weather today"]


def one(base, i, tokens):
    n = 0
    body = {"job_id": f"bench-{i}-{time.monotonic_ns()}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
            "temperature": 0.0}
    with httpx.Client(timeout=600) as c, c.stream("POST", f"{base}/execute", json=body) as r:
        replica = r.headers.get("x-llorch-replica")
        for line in r.iter_lines():
            n += line == "event: token"
    return n, replica


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replicas", default="1,2")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from llorch_cpud.server import ray_serve
    from llorch_cpud.server.app import ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    out = []
    try:
        for n in [int(x) for x in a.replicas.split(",")]:
            serve.run(ray_serve.bind(ServeConfig(model=a.model), ray_serve.RayOptions(replicas=n, threads=a.threads)),
                      name=ray_serve.APP_NAME, route_prefix="/")
            with cf.ThreadPoolExecutor(a.streams) as pool:
                list(pool.map(lambda i: one(base, i, 8), range(a.streams)))  # warm-up
                t0 = time.perf_counter()
                res = list(pool.map(lambda i: one(base, i, a.tokens), range(a.streams)))
                dt = time.perf_counter() - t0
            tokens = sum(n for n, _ in res)
            row = {"replicas": n, "threads_per_replica": a.threads, "streams": a.streams, "tokens": tokens,
                   "seconds": round(dt, 2), "aggregate_tokens_per_s": round(tokens / dt, 1),
                   "replicas_used": len({r for _, r in res}), "cpus": os.cpu_count()}
            print(json.dumps(row), flush=True)
            out.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


if __name__ == "__main__":
    main()
