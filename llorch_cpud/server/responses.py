"""The HTTP pieces app.py (/execute) and openai_routes.py (/v1/...) share: JSON responses, the request body
reader, and a job's event feed with its SSE response. See app.py for the decisions they implement."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.requests import ClientDisconnect

from llorch_cpud.logprobs import TokenTexts
from llorch_cpud.server import schemas
from llorch_cpud.server.logs import log
from llorch_cpud.server.scheduler import Job

SSE_PING_S = 15


def json_response(status: int, body: dict, headers: dict | None = None):
    return JSONResponse(status_code=status, content=body, headers=headers)


def errors_response(errors: list[dict], status: int = 400):
    return json_response(status, {"errors": schemas.order(errors)})


async def read_json(request, limits: schemas.Limits) -> tuple[object, list[dict], int]:
    """(value, [], 400) or (None, errors, status): 415 wrong Content-Type, 413 too large, 400 not strict JSON.
    The status is the one for any error found in the body from here on (400 unless the body itself is at fault)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        return None, [schemas.field_error("body", "Content-Type must be application/json", ctype or None,
                                          "Content-Type: application/json")], 415
    cap = limits.max_body_bytes
    too_large = [schemas.field_error("body", f"body larger than {cap} bytes", None, f"at most {cap} bytes (--max-body-bytes)")]
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        return None, too_large, 413
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cap:
                return None, too_large, 413
    except ClientDisconnect:
        return None, [schemas.field_error("body", "the client closed the connection before the whole body arrived")], 400
    data, errors = await asyncio.to_thread(schemas.parse_json, bytes(raw))
    return data, errors, 400


class JobFeed:
    """A consumer's view of one job: its events until the terminal one.

    `close()` (idempotent) must run when the consumer is done — normally, on error, or when
    the client went away — and cancels the job if it has not ended (freeing its KV cache
    within one engine step). Streaming responses (JobStream) call it when the response ends,
    however it ends; non-streaming ones when the result is collected or the client left."""

    def __init__(self, state, job: Job):  # state: app.WorkerState
        self.state, self.job = state, job
        self.closed = False
        self._pending: asyncio.Future | None = None
        state.open_streams += 1

    async def next_batch(self, timeout: float) -> list | None:
        """The next list of events, or None after `timeout` seconds (for consumers that poll for disconnects)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.job.queue.get())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout)  # a timeout does not cancel the get
        if not done:
            return None
        batch, self._pending = self._pending.result(), None
        return batch

    async def events(self):
        while True:
            batch = await self.job.queue.get()
            for kind, ev in batch:
                yield kind, ev
                if kind in ("end", "error"):
                    return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.state.open_streams -= 1
        if self._pending is not None:
            self._pending.cancel()
        job = self.job
        if not job.terminal:
            job.cancel("disconnect")
            if self.state.scheduler is not None:
                self.state.scheduler.wake()
            log("client went away; job cancelled", job_id=job.job_id, correlation_id=job.correlation_id)


class JobStream(EventSourceResponse):
    """The SSE response of one job. Its feed is closed (the job cancelled if it has not ended, the open
    stream count released) however the response ends: finished, client gone, or failed before its first
    byte."""

    def __init__(self, feed: JobFeed, content, headers: dict | None = None):
        super().__init__(content, ping=SSE_PING_S, headers=headers)
        self.feed = feed

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.feed.close()


def sse_response(feed: JobFeed, gen, job_id: str):
    """`job_id` has passed schemas.JobId (or was made by the worker): safe in a header."""
    return JobStream(feed, gen, headers={"X-Job-ID": job_id})


def token_texts(state):
    """The token bytes/texts (logprobs.TokenTexts) of the served model's tokenizer, built on first use."""
    if state.token_texts is None:
        state.token_texts = TokenTexts(state.engine.tokenizer)
    return state.token_texts
