"""Start-up and shut-down of the worker process.

Order of events:
1. resolve `--model` (a missing file fails at once: `error: ...`, exit 2) and bind the
   listening socket (a port in use fails at once the same way);
2. serve HTTP at once: `/health` answers `503 {"status": "loading"}`, every other path 503;
3. load the model in a background thread (progress lines on stderr), run one warm-up
   token, size the memory budget (budget.py; logged, and shown in /health; a budget too small
   for one step fails start-up), start the engine thread; `/health` turns `200 healthy`;
4. POST the ready callback (if `--callback-url`) with retry and exponential backoff; if no
   attempt succeeds the worker shuts down and exits 1 with `error: ready callback ...`;
5. on SIGTERM (or SIGINT): `/health` turns `503 draining`, new requests get 503, every
   queued and running job ends with its terminal event (`stop_reason: "cancelled"`), the
   streams are flushed, then uvicorn closes the listener and the process exits 0. A second
   signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import socket
import sys
import threading
import time
from pathlib import Path

from llorch_cpud import kernels
from llorch_cpud.engine import EndEvent, Request, load_engine
from llorch_cpud.errors import LlorchError
from llorch_cpud.formats import load_tokenizer, resolve
from llorch_cpud.sampling import SamplingParams
from llorch_cpud.server.app import ServeConfig, WorkerState, create_app
from llorch_cpud.server.budget import MemoryBudget
from llorch_cpud.server.logs import configure, log
from llorch_cpud.server.scheduler import Scheduler

DRAIN_TIMEOUT_S = 15.0
LOAD_PROGRESS_EVERY_S = 2.0
EXIT_STARTUP_FAILED = 1


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LlorchError(f"--host {host}: cannot resolve ({e.strerror})") from None
    family, _, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and
    # without it every small response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise LlorchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def advertised_uri(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def display_name(engine_name: str) -> str:
    p = Path(engine_name)
    return p.name if p.exists() else engine_name


def weights_bytes(model) -> int:
    """Bytes the model's weights hold (the views of a fused matrix are slices of it: their bytes add up to its)."""
    return int(sum(w.nbytes for w in model.tensors().values()))


def timed_h11_protocol(read_timeout: float):
    """uvicorn's h11 protocol with a read deadline: a request's headers and body must arrive within
    `read_timeout` seconds of the connection opening (or of its first byte on a kept-alive connection),
    else the connection is closed. uvicorn has no such option; without it a half-sent request holds its
    connection forever. (A handler waiting for the rest of the body then sees a client disconnect.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._read_deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
                self._disarm()  # the whole request is in (or the connection is over)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                log("request not received in time; connection closed", level=30, read_timeout_s=read_timeout,
                    client=f"{self.client[0]}:{self.client[1]}" if self.client else None,
                    state=str(self.conn.their_state))
                self.transport.close()

    return TimedH11Protocol


def _server_class():
    import uvicorn

    class WorkerServer(uvicorn.Server):
        """uvicorn, with a drain before exit and no re-raise of the signal (so SIGTERM exits 0)."""

        def __init__(self, config, state: WorkerState):
            super().__init__(config)
            self.state = state
            self._draining = False

        def handle_exit(self, sig, frame) -> None:  # installed by uvicorn as the SIGINT/SIGTERM handler
            if self._draining:
                log("second signal: exiting now", signal=int(sig))
                self.should_exit = True
                self.force_exit = True
                return
            log("signal received: draining", signal=int(sig))
            self.begin_shutdown()

        def begin_shutdown(self) -> None:
            if self._draining:
                return
            self._draining = True
            loop = self.state.loop
            if loop is None or loop.is_closed():
                self.should_exit = True
                return
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self) -> None:
            state = self.state
            state.status = "draining"
            if state.scheduler is not None:
                state.scheduler.cancel_all("shutdown")
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while (state.jobs or state.open_streams) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            log("drained", jobs_left=len(state.jobs), streams_left=state.open_streams)
            self.should_exit = True

    return WorkerServer


async def post_callback(state: WorkerState, server) -> None:
    import httpx

    cfg = state.config
    payload = {"worker_id": state.worker_id, "vram_bytes": 0, "uri": state.uri, "memory_bytes": state.memory_bytes(),
               "memory_type": "cpu", "model": state.model_name, "model_bytes": state.model_bytes,
               "context_length": state.engine.model.n_ctx}
    delay, last = 0.5, ""
    async with httpx.AsyncClient(timeout=cfg.callback_timeout) as client:
        for attempt in range(1, cfg.callback_attempts + 1):
            if state.status != "healthy":
                return  # shutting down anyway
            try:
                r = await client.post(cfg.callback_url, json=payload)
                if 200 <= r.status_code < 300:
                    log("ready callback delivered", callback_url=cfg.callback_url, attempt=attempt, status=r.status_code)
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < cfg.callback_attempts:
                log("ready callback failed; retrying", level=30, callback_url=cfg.callback_url, attempt=attempt,
                    error=last, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
    state.fatal = f"ready callback to {cfg.callback_url} failed after {cfg.callback_attempts} attempts (last: {last})"
    log("start-up failed", level=40, error=state.fatal)
    server.begin_shutdown()


def load_in_background(state: WorkerState, server, tokenizer=None) -> None:
    """Load the model off the event loop; hand the engine to the loop when done (`tokenizer`: the
    model's, built before the worker listened)."""
    cfg, loop = state.config, state.loop
    done = threading.Event()
    t0 = time.perf_counter()

    def progress():
        while not done.wait(LOAD_PROGRESS_EVERY_S):
            log("loading model", model=cfg.model, elapsed_s=round(time.perf_counter() - t0, 1),
                memory_bytes=state.memory_bytes())

    def run():
        try:
            log("loading model", model=cfg.model, elapsed_s=0.0)
            engine, path = load_engine(cfg.model, numerics=cfg.numerics, tokenizer=tokenizer)
            t_load = time.perf_counter() - t0
            warm = Request(prompt_ids=[engine.eos_token_id or 0], max_tokens=1,
                           sampling=SamplingParams(temperature=0.0), seed=0)
            ends = [e for e in engine.generate(warm) if isinstance(e, EndEvent)]
            assert ends, "warm-up produced no end event"
        except BaseException as e:  # noqa: BLE001 - reported, then the process exits non-zero
            done.set()
            if isinstance(e, LlorchError):
                state.fatal_exc = e
                state.fatal = str(e)
            else:
                state.fatal = f"model load failed: {type(e).__name__}: {e}"
            log("start-up failed", level=40, error=state.fatal)
            loop.call_soon_threadsafe(server.begin_shutdown)
            return
        done.set()
        log("model loaded", model=str(path), load_s=round(t_load, 3),
            warmup_ms=round((time.perf_counter() - t0 - t_load) * 1000, 1))
        loop.call_soon_threadsafe(lambda: loop.create_task(on_loaded(state, server, engine, t_load)))

    threading.Thread(target=progress, name="llorch-load-progress", daemon=True).start()
    threading.Thread(target=run, name="llorch-loader", daemon=True).start()


async def on_loaded(state: WorkerState, server, engine, load_seconds: float) -> None:
    cfg = state.config
    if state.status != "loading":  # a signal came while loading
        return
    try:
        budget = MemoryBudget.for_model(engine.model, budget_mb=cfg.memory_budget_mb, max_batch=cfg.max_batch,
                                        prefill_tokens=cfg.prefill_tokens)
    except LlorchError as e:
        state.fatal_exc, state.fatal = e, str(e)
        log("start-up failed", level=40, error=state.fatal)
        server.begin_shutdown()
        return
    state.budget = budget
    log("memory budget", memory_bytes=state.memory_bytes(), **budget.describe())
    state.engine = engine
    state.model_name = display_name(engine.name)
    state.model_bytes = weights_bytes(engine.model)
    state.load_seconds = load_seconds
    info = kernels.info()
    state.kernels = info["tier"] if engine.model.path != "numpy" else "numpy"
    for warning in info["warnings"]:
        log(warning, logging.WARNING, event="kernels")
    state.scheduler = Scheduler(engine, state.metrics, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                                on_terminal=state.on_terminal, prefill_tokens=cfg.prefill_tokens,
                                max_gap=cfg.max_gap, budget=budget)
    state.scheduler.start()
    sch = state.scheduler
    gauge = state.metrics.gauge
    gauge("llorch_queue_depth", "Jobs accepted and waiting for a batch slot.", lambda: sch.queued)
    gauge("llorch_active_jobs", "Jobs in the running batch (prefill or decode).", lambda: sch.running)
    gauge("llorch_memory_bytes", "Resident memory of the worker process.", state.memory_bytes)
    gauge("llorch_kv_cache_bytes", "KV cache bytes held by the active jobs.", lambda: sch.cache_bytes)
    gauge("llorch_memory_budget_bytes", "The memory budget for KV caches and one step's activations.",
          lambda: budget.total)
    gauge("llorch_model_loaded", "1 once the model is loaded.", lambda: 1 if state.engine is not None else 0)
    state.status = "healthy"
    log("ready", uri=state.uri, worker_id=state.worker_id, model=state.model_name, memory_bytes=state.memory_bytes(),
        model_bytes=state.model_bytes, load_s=round(load_seconds, 3))
    if cfg.callback_url:
        await post_callback(state, server)


def preload_modules() -> None:
    """Import what the loader thread will use (module bodies and C extensions' init hold the GIL)."""
    for name in ("llorch_cpud.engine", "llorch_cpud.formats.hf", "llorch_cpud.formats.gguf_load",
                 "llorch_cpud.models.gpt2", "llorch_cpud.models.llama", "llorch_cpud.kernels.ops", "llorch_cpud.kernels.screen",
                 "llorch_cpud.tokenizer", "llorch_cpud.sampling", "tokenizers", "safetensors.numpy", "gguf",
                 "numpy.random", "threadpoolctl", "psutil"):
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part; the loader reports it if the model needs it
            pass


def serve(cfg: ServeConfig) -> int:
    configure()
    import uvicorn
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()  # we end streams ourselves, each with a terminal event
    path = resolve(cfg.model)  # a missing model fails before anything else
    # Imports and a folder's tokenizer hold the GIL in long C calls (~100 ms for GPT-2's vocabulary and
    # merges): done before /health answers, so that it answers promptly while the weights load. A GGUF's
    # tokenizer comes from the metadata the loader parses anyway (parsing it twice costs ~0.3 s; its
    # build holds the GIL ~25 ms).
    preload_modules()
    tokenizer = load_tokenizer(cfg.model) if path.is_dir() else None
    sock = bind(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    state = WorkerState(config=cfg)
    state.uri = advertised_uri(cfg.host, port)
    state.worker_id = cfg.worker_id or f"llorch-cpud-{socket.gethostname()}-{port}"
    holder = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        log("listening", uri=state.uri, host=cfg.host, port=port, worker_id=state.worker_id,
            auth=bool(cfg.api_key), max_batch=cfg.max_batch)
        load_in_background(state, holder["server"], tokenizer)
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop)
        log("stopped")

    app = create_app(state, lifespan=lifespan)
    config = uvicorn.Config(app, host=cfg.host, port=port, log_config=None, access_log=False, lifespan="on",
                            http=timed_h11_protocol(cfg.read_timeout), ws="none", loop="asyncio", timeout_graceful_shutdown=10,
                            server_header=False)
    server = _server_class()(config, state)
    holder["server"] = server
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.fatal_exc is not None:
        raise state.fatal_exc
    if state.fatal:
        print(f"error: {state.fatal}", file=sys.stderr, flush=True)
        return EXIT_STARTUP_FAILED
    return 0
