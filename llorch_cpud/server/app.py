"""The HTTP side: FastAPI routes on the asyncio event loop, which never runs model math.

Routes: GET /health, POST /execute (SSE), POST /cancel, GET /metrics, GET /openapi.json, POST /tokenize and
POST /detokenize (llama-server's shapes), and the OpenAI-compatible /v1/models, /v1/completions,
/v1/chat/completions (openai_routes.py).

Decisions (see also schemas.py):
- Every POST body is read by `read_json`: `Content-Type: application/json` or 415; at most
  `--max-body-bytes` (a larger Content-Length is refused before a byte of the body is read,
  a chunked body as soon as it passes the limit) or 413; then strict JSON (schemas.parse_json,
  off the event loop) or 400. Every error names the field; nothing a client sends gets a 500,
  and an unexpected exception still answers JSON (`INTERNAL`).
- Timeouts: a request (headers and body) must arrive within `--read-timeout` seconds of the
  connection opening (or of its first byte on a kept-alive connection), else the
  connection is closed (runner.py); a job still running `--request-timeout` seconds after it
  was accepted ends with `error` TIMEOUT.
- /health is always open (no API key) and answers 503 `{"status": "loading"}` while the model
  loads and 503 `{"status": "draining"}` after SIGTERM; every other path answers 503 in
  those states, after the API-key check.
- /execute: the body is validated completely before any work (pydantic, then the prompt is
  tokenised off the event loop and checked against the context window: the field blamed is
  `prompt` when the prompt alone fills the context, otherwise `max_tokens`), then against the
  memory budget (budget.py: a request whose KV cache cannot fit even alone, the same fields).
  Every failing field is listed. A job_id that is still queued or running gets `409` (same error shape).
  The stream opens with `started` as soon as the job is accepted (it may then wait in the
  queue); `metrics` comes just before the terminal `end`; `error` replaces `end` only when
  inference itself fails (`INFERENCE_FAILED`). Cancelled jobs (POST /cancel, SIGTERM) end
  with `end` and `stop_reason: "cancelled"`.
- /execute's `logprobs: k` (0-20, an opt-in beyond SPEC's table) adds each token's log-probability and the k
  most likely alternatives to the `token` events (and to `end` for tokens that released no text); see logprobs.py.
- /execute's `json_schema` (a JSON Schema) or `grammar` (a Lark grammar), opt-ins beyond SPEC's table: structured
  output (structured.py); a constraint the library cannot compile is a 400 naming the field.
- POST /tokenize `{"content", "add_special": false, "with_pieces": false}` -> `{"tokens": [id, ...]}` (with_pieces:
  `[{"id", "piece"}]`, a piece being the token's text, or its bytes as a list of integers when they are not
  whole UTF-8); add_special true gives what the engine makes of a prompt (a BOS where the model asks for one).
  POST /detokenize `{"tokens"}` -> `{"content"}`; an id outside the vocabulary is a 400 naming `tokens`. Both
  take the API key and the body limits of the other routes.
- POST /cancel `{"job_id"}`: 200 `{"job_id", "cancelled": true, "state"}` for a queued or
  running job; 404 for an unknown or finished one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import psutil
from fastapi import FastAPI, Request  # Request at module level: FastAPI resolves the string annotations here
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from sse_starlette import ServerSentEvent

from llorch_cpud import __version__
from llorch_cpud.engine import Request as EngineRequest
from llorch_cpud.errors import ContextOverflow, InvalidRequest
from llorch_cpud.logprobs import TokenTexts, execute_logprobs
from llorch_cpud.sampling import SamplingParams
from llorch_cpud.server import schemas
from llorch_cpud.server.budget import MemoryBudget, TooLarge
from llorch_cpud.server.constraints import compile_constraint
from llorch_cpud.server.logs import correlation_id, log
from llorch_cpud.server.metrics import CONTENT_TYPE, Metrics
from llorch_cpud.server.openai_routes import add_openai_routes
from llorch_cpud.server.responses import JobFeed, errors_response, json_response, read_json, sse_response, token_texts
from llorch_cpud.server.scheduler import Job, NotAccepting, QueueFull, Scheduler


@dataclass
class ServeConfig:
    model: str | None
    host: str = "127.0.0.1"
    port: int = 8080
    worker_id: str | None = None
    callback_url: str | None = None
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    prefill_tokens: int = 512
    max_gap: float = 1.5
    numerics: str = "float32"
    callback_attempts: int = 6
    callback_timeout: float = 5.0
    limits: schemas.Limits = field(default_factory=schemas.Limits)
    read_timeout: float = 30.0  # seconds for a request's headers and body to arrive
    request_timeout: float = 600.0  # seconds from acceptance to the terminal event (then error TIMEOUT)
    memory_budget_mb: float | None = None  # KV caches + one step's activations (None: a share of the machine's)


@dataclass
class WorkerState:
    config: ServeConfig
    status: str = "loading"  # loading | healthy | draining
    engine: object = None
    scheduler: Scheduler | None = None
    budget: MemoryBudget | None = None
    metrics: Metrics = field(default_factory=Metrics)
    jobs: dict = field(default_factory=dict)  # job_id -> Job, until its terminal event is queued
    open_streams: int = 0
    model_name: str = ""
    worker_id: str = ""
    uri: str = ""
    model_bytes: int = 0
    load_seconds: float = 0.0
    kernels: str = ""  # the kernel tier the engine runs (kernels.info(): avx512-vnni | avx512 | avx2 | generic | numpy)
    started: float = field(default_factory=time.time)
    fatal: str | None = None  # start-up failure: the process exits non-zero with this reason
    fatal_exc: BaseException | None = None
    loop: asyncio.AbstractEventLoop | None = None
    token_texts: TokenTexts | None = None  # built on the first request that asks for log-probabilities

    def memory_bytes(self) -> int:
        try:
            return int(psutil.Process(os.getpid()).memory_info().rss)
        except Exception:
            return 0

    def on_terminal(self, job: Job) -> None:  # loop thread
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]


# ---------------------------------------------------------------------------- helpers


def context_errors(n_prompt: int, max_tokens: int, n_ctx: int, prompt: str) -> list[dict]:
    rule = f"prompt tokens + max_tokens <= context length {n_ctx}"
    if n_prompt == 0:
        return [schemas.field_error("prompt", "prompt encodes to no tokens", prompt)]
    if n_prompt >= n_ctx:
        return [schemas.field_error("prompt", f"prompt is {n_prompt} tokens; the model's context is {n_ctx} tokens "
                                              "and at least one must be left to generate", prompt, rule)]
    if n_prompt + max_tokens > n_ctx:
        return [schemas.field_error("max_tokens", f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = "
                                                  f"{n_prompt + max_tokens} exceeds the model's context length {n_ctx}; "
                                                  f"at most {n_ctx - n_prompt} for this prompt", max_tokens, rule)]
    return []


def engine_error(e: InvalidRequest, body: dict) -> dict:
    """An engine InvalidRequest (its message starts with the field name) as one field error."""
    msg = str(e)
    if isinstance(e, ContextOverflow):
        name = "max_tokens"
    else:
        head = msg.split(":", 1)[0].split(" ", 1)[0].strip()
        name = head if head in schemas.CONSTRAINTS or head in body else "prompt"
    return schemas.field_error(name, msg, body.get(name))


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def sampling_params(body, defaults=None) -> SamplingParams:
    """The body's sampling. `defaults` (formats.generation_defaults.SamplingDefaults: the OpenAI routes pass the
    model's) fill the fields the request left out; without them the body's own defaults apply (SPEC's: /execute)."""
    if defaults is None:
        return SamplingParams(**{k: getattr(body, k) for k in SAMPLING_FIELDS})
    given = body.model_fields_set
    return defaults.params(**{k: getattr(body, k) for k in SAMPLING_FIELDS if k in given})


class Admission:
    """Turn a validated body into a queued Job, or into the error response to send instead."""

    def __init__(self, state: WorkerState):
        self.state = state

    async def tokenize(self, prompt: str) -> list[int]:
        return await asyncio.to_thread(self.state.engine.tokenizer.encode, prompt)

    async def context_check(self, prompt, max_tokens) -> tuple[list[int] | None, list[dict]]:
        ids = await self.tokenize(prompt)
        return ids, self.limit_errors(len(ids), max_tokens, prompt)

    def limit_errors(self, n_prompt: int, max_tokens: int, prompt) -> list[dict]:
        """The model's context, then the memory budget (one request's KV cache alone)."""
        errors = context_errors(n_prompt, max_tokens, self.state.engine.model.n_ctx, prompt)
        if not errors and self.state.budget is not None:
            errors = self.state.budget.errors(n_prompt, max_tokens, prompt)
        return errors

    def max_positions(self) -> int:
        """Prompt tokens + max_tokens of the largest request the context and the memory budget allow."""
        n_ctx = self.state.engine.model.n_ctx
        return n_ctx if self.state.budget is None else min(n_ctx, self.state.budget.max_positions)

    def submit(self, *, endpoint: str, job_id: str, prompt: str, prompt_ids: list[int], body,
               on_errors=None, logprobs: int | None = None, prompt_logprobs: bool = False,
               grammar=None, defaults=None) -> Job | object:
        """Synchronous (no await between the duplicate check and the registration). `defaults`: sampling for the
        fields the body left out (sampling_params)."""
        on_errors = on_errors or errors_response
        state = self.state
        if job_id in state.jobs:
            state.metrics.request(endpoint, "conflict")
            return on_errors([schemas.field_error("job_id", "a job with this job_id is already queued or running",
                                                  job_id, "unique among queued and running jobs")], 409)
        sampling = sampling_params(body, defaults)
        req = EngineRequest(prompt=prompt, prompt_ids=prompt_ids, max_tokens=body.max_tokens, sampling=sampling,
                      seed=body.seed, stop=list(body.stop), job_id=job_id, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, grammar=grammar)
        try:
            seq = state.engine.start(req, defer_cache=True)  # allocated when the scheduler admits the job
        except InvalidRequest as e:
            state.metrics.request(endpoint, "invalid")
            return on_errors([engine_error(e, body.model_dump())], 400)
        job = Job(job_id=job_id, seq=seq, endpoint=endpoint, loop=asyncio.get_running_loop(),
                  correlation_id=correlation_id.get(), max_seconds=state.config.request_timeout)
        try:
            state.scheduler.submit(job)
        except QueueFull:
            state.metrics.request(endpoint, "overloaded")
            return json_response(503, {"error": {"code": "OVERLOADED", "message": f"queue full ({state.scheduler.max_queue} waiting)"}},
                                 headers={"Retry-After": "1"})
        except TooLarge:  # the routes check the budget first (limit_errors): only a bypassed check gets here
            state.metrics.request(endpoint, "invalid")
            return on_errors(self.limit_errors(len(seq.prompt_ids), body.max_tokens, prompt), 400)
        except NotAccepting:
            state.metrics.request(endpoint, "unavailable")
            return json_response(503, {"status": state.status, "error": {"code": "SHUTTING_DOWN", "message": "worker is shutting down"}})
        state.jobs[job_id] = job
        log("job accepted", job_id=job_id, endpoint=endpoint, prompt_tokens=len(seq.prompt_ids),
            max_tokens=body.max_tokens, seed=seq.seed, temperature=sampling.temperature, queued=state.scheduler.queued)
        return job


def end_payload(end) -> dict:
    d = {"tokens_out": end.tokens_out, "decode_time_ms": round(end.decode_time_ms, 3), "stop_reason": end.stop_reason,
         "seed": end.seed, "prompt_tokens": len(end.prompt_ids), "prefill_time_ms": round(end.prefill_time_ms, 3)}
    if end.stop_reason == "stop_sequence":
        d["stop_sequence_matched"] = end.stop_sequence_matched
    return d


def metrics_payload(end) -> dict:
    return {"tokens_per_sec": round(end.decode_tokens_per_sec, 3), "tokens_out": end.tokens_out,
            "prompt_tokens": len(end.prompt_ids), "time_to_first_token_ms": round(end.prefill_time_ms, 3),
            "decode_time_ms": round(end.decode_time_ms, 3)}


# ---------------------------------------------------------------------------- middleware


class Gate:
    """Pure ASGI middleware (streams pass straight through): correlation id, API key, readiness, access log."""

    def __init__(self, app, state: WorkerState):
        self.app = app
        self.state = state
        key = state.config.api_key
        self.expected = key.encode() if key else None

    def authorized(self, headers: dict) -> bool:
        """`Authorization: Bearer KEY`, the scheme in any case (RFC 7235)."""
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        cid = headers.get(b"x-correlation-id", b"").decode("latin-1").strip()
        if not cid or len(cid) > 200 or not cid.isprintable():
            cid = uuid.uuid4().hex
        token = correlation_id.set(cid)
        t0 = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-correlation-id", cid.encode("latin-1"))]
            await send(message)

        path = scope.get("path", "")
        try:
            if path != "/health" and self.expected is not None and not self.authorized(headers):
                await json_response(401, {"error": {"message": "missing or invalid API key (Authorization: Bearer KEY)",
                                                    "type": "authentication_error", "code": "invalid_api_key"}},
                                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_with_id)
            elif path != "/health" and self.state.status != "healthy":
                await json_response(503, {"status": self.state.status,
                                          "error": {"code": "UNAVAILABLE", "message": f"worker is {self.state.status}"}},
                                    headers={"Retry-After": "1"})(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if path != "/health":  # health checks would drown the log
                log("request", method=scope.get("method"), path=path, status=status["code"],
                    duration_ms=round((time.perf_counter() - t0) * 1000, 2))
            correlation_id.reset(token)


# ---------------------------------------------------------------------------- the app


def create_app(state: WorkerState, lifespan=None):
    app = FastAPI(title="llorch-cpud worker", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", lifespan=lifespan)
    admission = Admission(state)
    limits = state.config.limits
    body_models = [schemas.ExecuteBody, schemas.CancelBody, schemas.TokenizeBody, schemas.DetokenizeBody]
    # add_openai_routes adds its own

    async def read_body(request: Request, model):
        """(body, None) for a valid JSON body of `model`, else (None, the 4xx answer naming the fields)."""
        data, errors, status = await read_json(request, limits)
        if not errors:
            body, errors = schemas.validate(model, data)
        return (None, errors_response(errors, status)) if errors else (body, None)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # a bug of ours, still answered in JSON (uvicorn logs the traceback)
        return json_response(500, {"error": {"code": "INTERNAL", "message": f"internal error ({type(exc).__name__}); "
                                             f"see the worker log, correlation id {correlation_id.get()}"}})

    @app.get("/health")
    async def health():
        body = {
            "status": state.status,
            "model_loaded": state.engine is not None,
            "vram_bytes": 0,
            "memory_type": "cpu",
            "memory_bytes": state.memory_bytes(),
            "model": state.model_name,
            "worker_id": state.worker_id,
            "uptime_s": round(time.time() - state.started, 3),
        }
        if state.engine is not None:
            body.update(model_bytes=state.model_bytes, context_length=state.engine.model.n_ctx,
                        load_seconds=round(state.load_seconds, 3),
                        numerics=state.engine.model.numerics,
                        decode_path=state.engine.model.path, kernels=state.kernels,
                        sampling_defaults=state.engine.sampling_defaults.describe())
        if state.scheduler is not None:
            body.update(active_jobs=state.scheduler.running, queued_jobs=state.scheduler.queued,
                        max_batch=state.scheduler.max_batch, kv_cache_bytes=state.scheduler.cache_bytes,
                        kv_cache_peak_bytes=state.scheduler.cache_bytes_peak)
        if state.budget is not None:
            body.update(state.budget.describe())
        return json_response(200 if state.status == "healthy" else 503, body)

    @app.post("/execute", openapi_extra=schemas.openapi_body(schemas.ExecuteBody),
              responses=schemas.openapi_responses("an SSE stream: started, token..., metrics, end | error", 409, 503))
    async def execute(request: Request):
        data, errors, status = await read_json(request, limits)
        body = None
        if not errors:
            body, errors = schemas.validate(schemas.ExecuteBody, data)
        ids = None
        if isinstance(data, dict) and not {e["field"] for e in errors} & {"prompt", "max_tokens", "body"}:
            ids, more = await admission.context_check(data["prompt"], data["max_tokens"])
            errors += more
        grammar = None
        if body is not None and not errors:  # structured output (json_schema / grammar): compiled, or a 400
            field = "json_schema" if body.json_schema is not None else "grammar"
            grammar, errors = await compile_constraint(state, field, body.constraint(), data.get(field))
        if errors:
            state.metrics.request("execute", "invalid")
            log("invalid request", fields=[e["field"] for e in errors], status=status)
            return errors_response(errors, status)
        ignored = schemas.unknown_fields(schemas.ExecuteBody, data)
        if ignored:
            log("unknown fields ignored", job_id=body.job_id, ignored_fields=ignored)
        job = admission.submit(endpoint="execute", job_id=body.job_id, prompt=body.prompt, prompt_ids=ids, body=body,
                               logprobs=body.logprobs, grammar=grammar)
        if not isinstance(job, Job):
            return job
        texts = token_texts(state) if body.logprobs is not None else None

        feed = JobFeed(state, job)

        async def stream():
            sent = 0
            started = {"job_id": job.job_id, "model": state.model_name, "started_at": job.started_at}
            if ignored:
                started["ignored_fields"] = ignored
            yield ServerSentEvent(event="started", data=json.dumps(started, ensure_ascii=False))
            async for kind, ev in feed.events():
                if kind == "token":
                    d = {"t": ev.text, "i": ev.index}
                    if texts is not None:
                        d["logprobs"] = execute_logprobs(texts, ev.logprobs or [])
                        sent += len(ev.logprobs or [])
                    yield ServerSentEvent(event="token", data=json.dumps(d, ensure_ascii=False))
                elif kind == "end":
                    yield ServerSentEvent(event="metrics", data=json.dumps(metrics_payload(ev)))
                    d = end_payload(ev)
                    if texts is not None:  # tokens that released no text (a stop sequence's)
                        d["logprobs"] = execute_logprobs(texts, (ev.token_logprobs or [])[sent:])
                    yield ServerSentEvent(event="end", data=json.dumps(d, ensure_ascii=False))
                else:
                    yield ServerSentEvent(event="error", data=json.dumps(ev, ensure_ascii=False))

        return sse_response(feed, stream(), job.job_id)

    @app.post("/cancel", openapi_extra=schemas.openapi_body(schemas.CancelBody),
              responses=schemas.openapi_responses("{job_id, cancelled: true, state}", 404))
    async def cancel(request: Request):
        body, refused = await read_body(request, schemas.CancelBody)
        if refused:
            return refused
        job = state.jobs.get(body.job_id)
        if job is None:
            return json_response(404, {"errors": [schemas.field_error("job_id", "no queued or running job with this job_id",
                                                                      body.job_id, "a queued or running job")]})
        job.cancel("cancel")
        state.scheduler.wake()
        log("cancel requested", job_id=job.job_id)
        return json_response(200, {"job_id": job.job_id, "cancelled": True,
                                   "state": "running" if job.admitted else "queued"})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize", openapi_extra=schemas.openapi_body(schemas.TokenizeBody),
              responses=schemas.openapi_responses('{"tokens": [id, ...]} (with_pieces: [{"id", "piece"}, ...])', 503))
    async def tokenize(request: Request):
        body, refused = await read_body(request, schemas.TokenizeBody)
        if refused:
            return refused
        tok = state.engine.tokenizer
        if body.add_special:  # what the engine makes of a prompt (a BOS where the model asks for one)
            ids = await asyncio.to_thread(tok.encode, body.content)
        else:
            ids = (await asyncio.to_thread(tok.inner.encode, body.content, add_special_tokens=False)).ids
        ids = [int(i) for i in ids]
        if not body.with_pieces:
            return json_response(200, {"tokens": ids})
        texts = token_texts(state)

        def piece(i: int):  # llama-server: the text, or the bytes when they are not whole UTF-8
            b = texts.bytes(i)
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                return list(b)

        return json_response(200, {"tokens": [{"id": i, "piece": piece(i)} for i in ids]})

    @app.post("/detokenize", openapi_extra=schemas.openapi_body(schemas.DetokenizeBody),
              responses=schemas.openapi_responses('{"content": text}', 503))
    async def detokenize(request: Request):
        body, refused = await read_body(request, schemas.DetokenizeBody)
        if refused:
            return refused
        n_vocab = state.engine.tokenizer.vocab_size
        bad = [(j, t) for j, t in enumerate(body.tokens) if t >= n_vocab]
        if bad:
            j, t = bad[0]
            return errors_response([schemas.field_error(
                "tokens", f"tokens[{j}] = {t} is not a token id of this model's vocabulary (0-{n_vocab - 1}); "
                          f"{len(bad)} such id(s)", body.tokens)], 400)
        content = await asyncio.to_thread(state.engine.tokenizer.decode, body.tokens)
        return json_response(200, {"content": content})

    body_models += add_openai_routes(app, state, admission)

    def openapi():
        """FastAPI's document, with the request bodies (validated by hand, see read_json) from their models."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(schemas.openapi_components(body_models))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return Gate(app, state)
