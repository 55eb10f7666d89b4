"""The worker as a Ray Serve deployment: replicas of the same worker behind one HTTP endpoint (issue 19).

Needs `pip install "llorch-cpud[ray]"` (ray[serve]). Only `llorch-cpud serve --ray` and `serve run` import this
module; the CLI and the plain worker never import ray. See docs/scale-out.md.

Each replica is the plain worker's app (app.create_app: the same routes, Gate, engine thread, scheduler and
memory budget; loaded with runner.on_loaded) served by Serve's proxy through `@serve.ingress`, built on the replica
after the model has loaded (`__serve_build_asgi_app__`). Around it, `ReplicaGate` adds:
- `X-Llorch-Replica: <replica id>` on every response (and `replica_id` in /health), so clients and tests can see
  which replica served them;
- `/cancel` that reaches the job on whichever replica holds it: answered locally when the job is here, otherwise
  forwarded through a deployment handle to every other running replica (`ReplicaRouter` routes a handle call that
  names a replica to that replica; HTTP requests keep Serve's power-of-two-choices, load-aware routing).

Health (`check_health`, called by Serve every `health_check_period_s`): raises when the model is not loaded, the
engine thread is dead, or it is wedged (jobs waiting or running and no engine step finished for `wedge_seconds`),
so Serve replaces the replica. Drain: when Serve begins to stop the replica (scale-down, redeploy, `serve
shutdown`) it stops routing to it and waits for the open requests; the replica lets running jobs finish for
`drain_grace_s`, then ends the rest with their terminal events (`end`, stop_reason `cancelled`), as the single
worker does on SIGTERM. A replica that dies (process killed, node lost) cuts its streams: no terminal event on
/execute, no `data: [DONE]` on the OpenAI routes; clients retry those (docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass

from ray import serve
from ray.serve.request_router import PendingRequest, RunningReplica
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from llorch_cpud.server.app import ServeConfig, WorkerState, create_app
from llorch_cpud.server.logs import log
from llorch_cpud.server.schemas import Limits

REPLICA_HEADER = b"x-llorch-replica"
TARGET_KWARG = "llorch_replica"  # a handle call's keyword naming the replica ReplicaRouter must route it to
DEPLOYMENT = "LlorchWorker"
APP_NAME = "llorch"


@dataclass
class RayOptions:
    replicas: int | None = 1  # fixed number of replicas (None: autoscaling)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    threads: int = 1  # CPUs (Ray resources) and OpenMP threads per replica
    max_ongoing_requests: int | None = None  # None: the scheduler's batch plus its queue share (max_batch * 2)
    wedge_seconds: float = 60.0
    drain_grace_s: float = 10.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0


class ReplicaRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices (load-aware), except a handle call with `llorch_replica=<id>` goes to that replica."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_KWARG) if pending_request is not None else None
        if target:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        return await super().choose_replicas(candidate_replicas, pending_request)


def _log_to_stderr() -> None:
    """The worker's JSON log lines on the replica's stderr (Ray: the replica's worker log, and the driver's console
    with log_to_driver), without touching the root logger, which Ray's own logging owns."""
    import logging
    import sys

    from llorch_cpud.server.logs import LOGGER_NAME, JsonFormatter

    lg = logging.getLogger(LOGGER_NAME)
    if not lg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def _replica_shutting_down() -> bool | None:
    """Whether Serve has begun this replica's graceful shutdown (None: cannot tell; Ray internals)."""
    try:
        import ray._private.worker as w

        worker = w.global_worker
        actor = worker.actors.get(worker.actor_id)
        return bool(actor._replica_impl._shutting_down)
    except Exception:
        return None


class ReplicaGate:
    """ASGI wrapper of the worker app on one replica: the replica header, and /cancel forwarded to other replicas."""

    def __init__(self, app, replica):
        self.app = app
        self.replica = replica
        self.header = (REPLICA_HEADER, replica.replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        if scope.get("path") == "/cancel" and scope.get("method") == "POST":
            return await self.cancel(scope, receive, send_tagged)
        return await self.app(scope, receive, send_tagged)

    async def cancel(self, scope, receive, send):
        """The worker's own /cancel first (validation, 404 shape); on a 404, ask the other replicas."""
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.replica.state.config.limits.max_body_bytes:
                break  # the app answers 413 on what it gets

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        held: list[dict] = []

        async def hold(message):
            held.append(message)

        await self.app(scope, replay, hold)
        status = held[0]["status"] if held else 500
        if status == 404:
            try:
                job_id = json.loads(bytes(body))["job_id"]
            except Exception:
                job_id = None
            found = await self.replica.cancel_elsewhere(job_id) if isinstance(job_id, str) else None
            if found is not None:
                data = json.dumps(found["body"]).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(data)).encode()),
                                        (b"x-llorch-cancelled-on", found["replica_id"].encode())]})
                await send({"type": "http.response.body", "body": data})
                return
        for message in held:
            await send(message)


@serve.ingress()
class LlorchWorker:
    """One replica: one worker (model, engine thread, scheduler) and its HTTP app."""

    async def __init__(self, config: dict, options: dict):
        from sse_starlette.sse import AppStatus

        from llorch_cpud.engine import EndEvent, Request, load_engine
        from llorch_cpud.sampling import SamplingParams
        from llorch_cpud.server.runner import on_loaded

        AppStatus.disable_automatic_graceful_drain()  # streams end with our own terminal events
        _log_to_stderr()
        config = dict(config)
        config["limits"] = Limits(**config["limits"])
        cfg = ServeConfig(**config)
        self.options = RayOptions(**options)  # replica_options(): the scaling fields keep their defaults here
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.app_name = ctx.app_name
        self.deployment = ctx.deployment
        state = WorkerState(config=cfg)
        state.worker_id = f"{cfg.worker_id or 'llorch-cpud'}-{self.replica_id}"
        state.uri = f"ray-serve://{self.app_name}/{self.deployment}#{self.replica_id}"
        state.loop = asyncio.get_running_loop()
        self.state = state
        self._handle = None

        t0 = time.perf_counter()

        def load():
            engine, _ = load_engine(cfg.model, numerics=cfg.numerics)
            warm = Request(prompt_ids=[engine.eos_token_id or 0], max_tokens=1,
                           sampling=SamplingParams(temperature=0.0), seed=0)
            assert any(isinstance(e, EndEvent) for e in engine.generate(warm)), "warm-up produced no end event"
            return engine

        engine = await asyncio.to_thread(load)

        class NoServer:  # on_loaded's failure path calls server.begin_shutdown(): the replica fails to start instead
            def begin_shutdown(self):
                pass

        await on_loaded(state, NoServer(), engine, time.perf_counter() - t0)
        if state.fatal:
            raise RuntimeError(state.fatal)
        self._progress = (self._steps(), time.monotonic())
        self._watch = asyncio.get_running_loop().create_task(self._watch_shutdown())
        log("replica ready", replica_id=self.replica_id, model=state.model_name, threads=self.options.threads,
            max_batch=cfg.max_batch)

    def __serve_build_asgi_app__(self):
        gate = create_app(self.state)  # the worker's app behind its Gate (API key, readiness, correlation id)
        add_replica_routes(gate.app, self)
        return ReplicaGate(HealthReplicaId(gate, self.replica_id), self)

    # ------------------------------------------------------------------ health

    def _steps(self) -> float:
        m = self.state.metrics
        return m.value("llorch_decode_steps_total") + m.value("llorch_prefill_steps_total")

    def unhealthy_reason(self) -> str | None:
        """The worker's own health: loaded, engine thread alive, not wedged (jobs pending, no step for a while)."""
        state = self.state
        if state.status == "draining":
            return None  # being stopped anyway
        if state.status != "healthy" or state.engine is None or state.scheduler is None:
            return f"worker is {state.status}"
        sch = state.scheduler
        if not sch.thread.is_alive():
            return "engine thread is not running"
        steps, now = self._steps(), time.monotonic()
        if steps != self._progress[0] or not (sch.running or sch.queued or sch.inbox):
            self._progress = (steps, now)
        elif now - self._progress[1] > self.options.wedge_seconds:
            return f"engine wedged: jobs pending and no step finished for {now - self._progress[1]:.0f} s"
        return None

    async def check_health(self):
        reason = self.unhealthy_reason()
        if reason:
            log("replica unhealthy", level=40, replica_id=self.replica_id, reason=reason)
            raise RuntimeError(reason)

    # ------------------------------------------------------------------ cancel across replicas

    async def cancel_local(self, job_id: str, **_route) -> dict | None:
        """Cancel a queued or running job if this replica holds it (the `/cancel` route's effect)."""
        job = self.state.jobs.get(job_id)
        if job is None:
            return None
        job.cancel("cancel")
        self.state.scheduler.wake()
        log("cancel requested", job_id=job_id, via="another replica")
        return {"replica_id": self.replica_id,
                "body": {"job_id": job_id, "cancelled": True, "state": "running" if job.admitted else "queued"}}

    async def metrics_text(self, **_route) -> str:
        return self.state.metrics.render().decode()

    def replicas(self) -> list[dict]:
        """This deployment's replicas as Serve's controller lists them (running ones)."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        dep = details["applications"][self.app_name]["deployments"][self.deployment]
        return [{"replica_id": r["replica_id"], "state": r["state"], "pid": r.get("pid"), "node_ip": r.get("node_ip"),
                 "actor_name": r.get("actor_name")} for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]

    def handle(self):
        if self._handle is None:
            self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
        return self._handle

    async def on_each(self, method: str, *args, ids: list[str], timeout: float = 10.0):
        """(replica_id, result or exception) of `method` called on each of `ids`, as they answer."""
        async def one(rid):
            call = getattr(self.handle(), method).remote(*args, **{TARGET_KWARG: rid})
            try:
                return rid, await asyncio.wait_for(_await(call), timeout)
            except Exception as e:  # noqa: BLE001 - a replica gone meanwhile
                return rid, e

        for done in asyncio.as_completed([one(rid) for rid in ids]):
            yield await done

    async def cancel_elsewhere(self, job_id: str) -> dict | None:
        try:
            others = [r["replica_id"] for r in await asyncio.to_thread(self.replicas) if r["replica_id"] != self.replica_id]
        except Exception as e:  # noqa: BLE001 - the controller unreachable: answer 404 as the worker would
            log("cancel: replicas unknown", level=30, error=f"{type(e).__name__}: {e}")
            return None
        async for rid, result in self.on_each("cancel_local", job_id, ids=others):
            if isinstance(result, Exception):
                log("cancel: a replica did not answer", level=30, replica_id=rid, error=f"{type(result).__name__}: {result}")
            elif result is not None:
                return result
        return None

    # ------------------------------------------------------------------ drain

    async def _watch_shutdown(self):
        """Drain as soon as Serve begins to stop this replica (Serve itself only waits for the open requests, and
        kills the replica when graceful_shutdown_timeout_s runs out). If Ray's internals have moved, the drain runs
        from __del__ only, once Serve has waited for the requests."""
        while True:
            down = _replica_shutting_down()
            if down is None:
                log("replica: cannot see Serve's shutdown flag; draining from __del__ only", level=30)
                return
            if down:
                break
            await asyncio.sleep(0.1)
        await self.drain()

    async def drain(self):
        state = self.state
        if state.status == "draining":
            return
        state.status = "draining"
        log("replica draining", replica_id=self.replica_id, jobs=len(state.jobs), grace_s=self.options.drain_grace_s)
        deadline = time.monotonic() + self.options.drain_grace_s
        while state.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.scheduler is not None:
            state.scheduler.cancel_all("shutdown")
        deadline = time.monotonic() + 10.0
        while (state.jobs or state.open_streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        log("drained", replica_id=self.replica_id, jobs_left=len(state.jobs), streams_left=state.open_streams)

    async def __del__(self):
        try:
            await self.drain()
            if self.state.scheduler is not None:
                await asyncio.to_thread(self.state.scheduler.stop, 5.0)
        except Exception:
            pass


async def _await(response):
    return await response


def add_replica_routes(app, replica: LlorchWorker) -> None:
    """GET /replicas (the running replicas) and GET /replicas/metrics (every replica's Prometheus metrics, each
    sample labelled `replica`), added to the worker's FastAPI app: behind its Gate, as every other route."""
    from fastapi.responses import JSONResponse, Response

    from llorch_cpud.server.metrics import CONTENT_TYPE

    @app.get("/replicas", include_in_schema=False)
    async def list_replicas():
        return JSONResponse({"replicas": await asyncio.to_thread(replica.replicas), "this": replica.replica_id})

    @app.get("/replicas/metrics", include_in_schema=False)
    async def all_metrics():
        ids = [r["replica_id"] for r in await asyncio.to_thread(replica.replicas)]
        texts = {replica.replica_id: await replica.metrics_text()}  # this replica's own, without a handle call
        missing = [rid for rid in ids if rid not in texts]
        # A replica's first handle call waits for Serve to tell its router about the others (seconds on a loaded
        # machine): the ones that did not answer get a second, longer try before being reported missing.
        for timeout in (10.0, 30.0):
            answers = [x async for x in replica.on_each("metrics_text", ids=missing, timeout=timeout)]
            texts.update((rid, r) for rid, r in answers if not isinstance(r, Exception))
            missing = [rid for rid in missing if rid not in texts]
            if not missing:
                break
        headers = {"X-Llorch-Replicas-Missing": ",".join(missing)} if missing else None
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE, headers=headers)


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus text from several replicas as one exposition: each family once, each sample with `replica`."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict = {}
    for rid, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, fam)
            samples = [Sample(s.name, {**s.labels, "replica": rid}, s.value, s.timestamp, s.exemplar) for s in fam.samples]
            if merged is fam:
                fam.samples = samples
            else:
                merged.samples.extend(samples)

    class Collected:
        def collect(self):
            return list(families.values())

    return generate_latest(Collected())


class HealthReplicaId:
    """Adds `replica_id` to /health's JSON body (the body is small and not streamed)."""

    def __init__(self, app, replica_id: str):
        self.app, self.replica_id = app, replica_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/health":
            return await self.app(scope, receive, send)
        held = []

        async def hold(message):
            held.append(message)

        await self.app(scope, receive, hold)
        body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        try:
            data = json.loads(body)
            data["replica_id"] = self.replica_id
            body = json.dumps(data).encode()
        except Exception:
            pass
        start = next(m for m in held if m["type"] == "http.response.start")
        start["headers"] = [(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                            for k, v in start.get("headers", [])]
        await send(start)
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------- building and running


def config_dict(cfg: ServeConfig) -> dict:
    return asdict(cfg)  # plain data for Ray (limits as a dict)


def deployment_options(cfg: ServeConfig, opts: RayOptions) -> dict:
    from ray.serve.config import RequestRouterConfig

    max_ongoing = opts.max_ongoing_requests or cfg.max_batch * 2
    env = {"OMP_NUM_THREADS": str(opts.threads), "RAY_USAGE_STATS_ENABLED": "0"}
    if os.environ.get("OMP_WAIT_POLICY"):
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    d = dict(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": opts.threads, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=max_ongoing,
        health_check_period_s=opts.health_check_period_s,
        health_check_timeout_s=opts.health_check_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=opts.drain_grace_s + 15.0,
        request_router_config=RequestRouterConfig(request_router_class=ReplicaRouter),
    )
    if opts.replicas is not None:
        d["num_replicas"] = opts.replicas
    else:
        d["autoscaling_config"] = {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                                   "initial_replicas": opts.min_replicas,
                                   "target_ongoing_requests": opts.target_ongoing_requests,
                                   "upscale_delay_s": opts.upscale_delay_s, "downscale_delay_s": opts.downscale_delay_s,
                                   "metrics_interval_s": 1.0, "look_back_period_s": 2.0}
    return d


def bind(cfg: ServeConfig, opts: RayOptions):
    """The Serve application: `serve.run(bind(cfg, opts), name=APP_NAME, route_prefix="/")`."""
    return serve.deployment(LlorchWorker).options(**deployment_options(cfg, opts)).bind(config_dict(cfg), replica_options(opts))


def replica_options(opts: RayOptions) -> dict:
    """What a replica reads of the options: not the scaling ones (a change in the replicas' arguments is a new
    version of the deployment, which Serve rolls out by replacing every replica; a change of scale is not)."""
    return {k: getattr(opts, k) for k in ("threads", "wedge_seconds", "drain_grace_s")}


def build_app(args: dict):
    """`serve run llorch_cpud.server.ray_serve:build_app model=PATH replicas=2 threads=1` (Serve's application
    builder: `key=value` arguments, any ServeConfig or RayOptions field; min_replicas/max_replicas autoscale)."""
    args = {k.replace("-", "_"): v for k, v in dict(args).items()}
    cfg, opts = ServeConfig(model=args.pop("model", None)), RayOptions()
    optional = {"replicas": int, "max_ongoing_requests": int, "memory_budget_mb": float}
    for k, v in args.items():
        target = opts if k in RayOptions.__dataclass_fields__ else cfg if k in ServeConfig.__dataclass_fields__ else None
        if target is None or k == "limits":
            raise ValueError(f"build_app: unknown argument {k!r}")
        cur = getattr(target, k)
        setattr(target, k, optional.get(k, str)(v) if cur is None else type(cur)(v))
    if ("min_replicas" in args or "max_replicas" in args) and "replicas" not in args:
        opts.replicas = None
    return bind(cfg, opts)


def run(cfg: ServeConfig, opts: RayOptions, ray_address: str | None = None) -> int:
    """`llorch-cpud serve --ray`: start (or join) Ray, deploy, serve until SIGINT/SIGTERM, then shut Serve down
    (each replica drains)."""
    import signal
    import threading

    import ray

    from llorch_cpud.formats import resolve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.model is not None:
        cfg.model = str(resolve(cfg.model))  # a missing model fails here, before Ray starts
    if ray_address:
        ray.init(address=ray_address, logging_level="WARNING")
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(bind(cfg, opts), name=APP_NAME, route_prefix="/", blocking=False)
    log("ray serve ready", uri=f"http://{cfg.host}:{cfg.port}", replicas=opts.replicas,
        autoscaling=None if opts.replicas is not None else f"{opts.min_replicas}-{opts.max_replicas}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log("shutting down: replicas drain")
    serve.shutdown()
    ray.shutdown()
    return 0
