"""`llorch-cpud serve`: the worker daemon (SPEC §4). Registered by llorch_cpud/cli.py.

No heavy imports here (fastapi, uvicorn, numpy): `llorch-cpud generate` imports this module too.
"""

from __future__ import annotations

import argparse
import os

from llorch_cpud.arguments import add_numerics_argument, ranged
from llorch_cpud.errors import LlorchError


def _ranged_int(lo, hi, name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {text}")
        return v

    return parse


def register(subparsers) -> None:
    s = subparsers.add_parser("serve", help="run the worker daemon (HTTP: /health, /execute, /v1/completions, ...)")
    s.add_argument("--model", default=None,
                   help="Hugging Face folder, .gguf file or hub name (default: embedded SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    s.add_argument("--port", type=_ranged_int(0, 65535, "--port"), default=8080, help="0 picks a free port")
    s.add_argument("--worker-id", default=None, help="sent in the ready callback (default: llorch-cpud-HOST-PORT)")
    s.add_argument("--callback-url", default=None, help="POSTed {worker_id, vram_bytes, uri, ...} once ready")
    s.add_argument("--api-key", default=os.environ.get("LLORCH_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $LLORCH_API_KEY, which keeps the key out of the process list)")
    s.add_argument("--max-batch", type=_ranged_int(1, 1024, "--max-batch"), default=16,
                   help="most sequences decoded together in one step (others wait in the queue)")
    s.add_argument("--prefill-tokens", type=_ranged_int(1, 1 << 20, "--prefill-tokens"), default=512,
                   help="most prompt tokens one step prefills, as chunks of the waiting prompts, oldest first "
                        "(default 512)")
    s.add_argument("--max-gap", type=ranged(float, 1.1, 100.0, "--max-gap"), default=1.5,
                   help="while streams are decoding, a step's prompt chunk is sized (from measured step times) to "
                        "keep the step under this many decode steps, at least one prompt token (default 1.5)")
    add_numerics_argument(s)
    s.add_argument("--max-queue", type=_ranged_int(1, 100000, "--max-queue"), default=256,
                   help="most jobs waiting for a batch slot before new ones get 503")
    s.add_argument("--max-body-bytes", type=_ranged_int(1024, 1 << 30, "--max-body-bytes"), default=1 << 20,
                   help="largest request body (default 1 MiB); larger ones get 413 before they are read")
    s.add_argument("--max-messages", type=_ranged_int(1, 100000, "--max-messages"), default=128,
                   help="chat: most messages in one request (default 128)")
    s.add_argument("--max-chat-chars", type=_ranged_int(1, 1 << 24, "--max-chat-chars"), default=32768,
                   help="chat: most characters of all messages' content together (default 32768, as a prompt)")
    s.add_argument("--read-timeout", type=ranged(float, 0.1, 3600.0, "--read-timeout"), default=30.0,
                   help="seconds for a request's headers and body to arrive before the connection is closed (default 30)")
    s.add_argument("--request-timeout", type=ranged(float, 0.1, 86400.0, "--request-timeout"), default=600.0,
                   help="seconds from a job's acceptance to its end; past it the job ends with error TIMEOUT (default 600)")
    s.add_argument("--memory-budget-mb", type=ranged(float, 1.0, float(1 << 30), "--memory-budget-mb"), default=None,
                   help="MiB for the running requests' KV caches and one step's activations; a request that cannot fit "
                        "alone gets 400, one that cannot fit beside the running ones waits in the queue (default: half "
                        "of the memory available once the model has loaded)")
    s.add_argument("--callback-attempts", type=_ranged_int(1, 100, "--callback-attempts"), default=6,
                   help="ready-callback tries (backoff 0.5 s doubling to 8 s) before start-up fails")
    r = s.add_argument_group("Ray Serve (pip install 'llorch-cpud[ray]'; docs/scale-out.md)")
    r.add_argument("--ray", action="store_true",
                   help="serve replicas of this worker on Ray Serve behind one endpoint (--host/--port: Serve's proxy)")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one on loopback)")
    r.add_argument("--replicas", type=_ranged_int(1, 1024, "--replicas"), default=None,
                   help="fixed number of replicas (default 1; give --min-replicas/--max-replicas to autoscale instead)")
    r.add_argument("--min-replicas", type=_ranged_int(0, 1024, "--min-replicas"), default=None)
    r.add_argument("--max-replicas", type=_ranged_int(1, 1024, "--max-replicas"), default=None)
    r.add_argument("--target-ongoing-requests", type=ranged(float, 0.1, 1e6, "--target-ongoing-requests"), default=None,
                   help="autoscaling: ongoing requests per replica to aim for (default: --max-batch / 2)")
    r.add_argument("--threads", type=_ranged_int(1, 1024, "--threads"), default=1,
                   help="CPUs reserved and OpenMP threads per replica (default 1)")
    r.add_argument("--max-ongoing-requests", type=_ranged_int(1, 1 << 20, "--max-ongoing-requests"), default=None,
                   help="most requests Serve sends one replica at once (default: 2 x --max-batch)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(a) -> int:
    from llorch_cpud.server.app import ServeConfig  # fastapi, numpy: only when serving
    from llorch_cpud.server.schemas import Limits
    from llorch_cpud.server.runner import serve

    if a.callback_url is not None and not a.callback_url.startswith(("http://", "https://")):
        raise LlorchError(f"--callback-url must be an http:// or https:// URL, got {a.callback_url!r}")
    if a.api_key is not None and not a.api_key:
        raise LlorchError("--api-key must not be empty")
    cfg = ServeConfig(model=a.model, host=a.host, port=a.port, worker_id=a.worker_id, callback_url=a.callback_url,
                      api_key=a.api_key, max_batch=a.max_batch, max_queue=a.max_queue, prefill_tokens=a.prefill_tokens, max_gap=a.max_gap,
                      numerics=a.numerics, callback_attempts=a.callback_attempts,
                      limits=Limits(max_body_bytes=a.max_body_bytes, max_messages=a.max_messages,
                                    max_chat_chars=a.max_chat_chars),
                      read_timeout=a.read_timeout, request_timeout=a.request_timeout,
                      memory_budget_mb=a.memory_budget_mb)
    if a.ray:
        return serve_ray(cfg, a)
    if a.ray_address or a.replicas or a.min_replicas is not None or a.max_replicas is not None:
        raise LlorchError("--ray-address, --replicas, --min-replicas and --max-replicas need --ray")
    return serve(cfg)


def serve_ray(cfg, a) -> int:
    try:
        from llorch_cpud.server import ray_serve
    except ImportError as e:
        raise LlorchError(f"--ray needs Ray Serve: pip install 'llorch-cpud[ray]' ({e})") from None
    if a.callback_url is not None:
        raise LlorchError("--callback-url is not used with --ray (Serve reports readiness: `serve status`, GET /replicas)")
    autoscale = a.min_replicas is not None or a.max_replicas is not None
    if autoscale and a.replicas is not None:
        raise LlorchError("give either --replicas or --min-replicas/--max-replicas, not both")
    opts = ray_serve.RayOptions(replicas=None if autoscale else (a.replicas or 1), threads=a.threads,
                                max_ongoing_requests=a.max_ongoing_requests)
    if autoscale:
        opts.min_replicas = a.min_replicas if a.min_replicas is not None else 1
        opts.max_replicas = a.max_replicas if a.max_replicas is not None else max(opts.min_replicas, 2)
        if opts.max_replicas < max(opts.min_replicas, 1):
            raise LlorchError("--max-replicas must be at least --min-replicas and at least 1")
        opts.target_ongoing_requests = a.target_ongoing_requests or max(1.0, cfg.max_batch / 2)
    return ray_serve.run(cfg, opts, ray_address=a.ray_address)
