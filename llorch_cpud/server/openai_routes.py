"""OpenAI-compatible endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Enough of the OpenAI API for the official `openai` client, streaming and not. Requests go
through the same validation, queue and engine thread as /execute.

Decisions:
- Supported parameters: prompt (a string, a list of one string, a list of token ids, or a list of one
  list of token ids - what lm-evaluation-harness sends),
  messages, max_tokens (completions default 16; chat default: what the context leaves, at
  most 2048, within the memory budget; `max_completion_tokens` is an alias), temperature, top_p, seed, stop (string or
  list), stream, stream_options.include_usage, n (must be 1), and the llorch extras top_k,
  min_p, repetition_penalty; log-probabilities: completions' `logprobs` (0-20) and `echo`
  (the prompt's text, and with logprobs its tokens' log-probabilities, the first one null;
  `max_tokens: 0` with echo scores the prompt only), chat's `logprobs` / `top_logprobs` (0-20);
  structured output: `response_format` {"type": "text" | "json_object" | "json_schema", "json_schema": {"name",
  "schema", "strict"}} (structured.py: the output is held to the schema by masking the logits; a schema the
  constraint library cannot compile is a 400 naming response_format and what it does not support; `strict` is
  accepted and the schema is always enforced).
  Log-probabilities are the model's distribution (log-softmax in float64 of the float32
  logits), before repetition penalty, temperature, top-k/top-p/min-p; an EOS token has no
  entry; tokens cut with a stop sequence keep theirs. `text_offset` counts characters into
  the returned `text`. `null` means "default". Sampling fields left out (or null) take the model's
  recommendation (formats/generation_defaults.py: generation_config.json, GGUF general.sampling.*, else
  llama.cpp's defaults), shown in /v1/models and /health as `sampling_defaults`.
  Unsupported parameters that would change the output (best_of > 1, suffix, tools) are a 400; the rest
  (model, user, presence/frequency penalty 0, logit_bias {} ...) are ignored. `model` is
  not checked: one worker serves one model, named in /v1/models.
- finish_reason: "stop" for EOS and stop sequences, "length" for max_tokens, "stop" for a
  cancelled job too; the precise reason is in the extra choice field `llorch_stop_reason`.
- Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` plus the
  worker's `errors` list (every failing field).
- Chat applies the model's own chat template; a model without one gets 400 (param `messages`).
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request  # module level: FastAPI resolves the string annotations here
from sse_starlette import ServerSentEvent

from llorch_cpud.errors import InvalidRequest
from llorch_cpud.logprobs import chat_logprobs, completion_logprobs
from llorch_cpud.server import schemas
from llorch_cpud.server.constraints import compile_constraint
from llorch_cpud.server.logs import log
from llorch_cpud.server.responses import JobFeed, json_response, read_json, sse_response, token_texts
from llorch_cpud.server.scheduler import Job
from llorch_cpud.tokenizer.chat import apply_chat_template

UNSUPPORTED = {
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v not in (None, ""),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
}


def openai_errors(errors: list[dict], status: int = 400):
    errors = schemas.order(errors)
    kind = {404: "not_found_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    first = errors[0] if errors else {}
    return json_response(status, {
        "error": {"message": "; ".join(f"{e['field']}: {e['message']}" for e in errors), "type": kind,
                  "param": first.get("field"), "code": None},
        "errors": errors,
    })


def finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "max_tokens" else "stop"


def _normalise(data: dict, chat: bool) -> tuple[dict, list[dict], list[int] | None]:
    """Drop nulls, accept OpenAI's alternative forms, reject parameters we cannot honour."""
    data = {k: v for k, v in data.items() if v is not None}
    errors = []
    for name, bad in UNSUPPORTED.items():
        if name in data and bad(data[name]):
            errors.append(schemas.field_error(name, f"{name} is not supported by this worker", data[name], "not supported"))
    if isinstance(data.get("stop"), str):
        data["stop"] = [data["stop"]]
    if chat and "max_tokens" not in data and "max_completion_tokens" in data:
        data["max_tokens"] = data["max_completion_tokens"]
    prompt_ids = None
    if not chat:
        p = data.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            data["prompt"] = p[0]
        elif isinstance(p, list) and len(p) == 1 and isinstance(p[0], list):
            p = p[0]  # one prompt of token ids (lm-evaluation-harness's batches of one)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            prompt_ids = list(p)
            data["prompt"] = "<token ids>"
        elif isinstance(p, list):
            errors.append(schemas.field_error("prompt", "prompt must be a string, a list of one string, or a list of "
                                                        "token ids (or a list of one such list)",
                                              p, "string of 1-32768 characters (or one list of token ids)"))
            data.pop("prompt")
        if data.get("max_tokens") == 0 and data.get("echo") is not True:
            errors.append(schemas.field_error("max_tokens", "max_tokens 0 needs echo: true (score the prompt only)", 0,
                                              "integer in [1, 2048] (0 with echo: true)"))
    else:
        if data.get("top_logprobs", 0) not in (0, False) and data.get("logprobs") is not True:
            errors.append(schemas.field_error("top_logprobs", "top_logprobs needs logprobs: true",
                                              data["top_logprobs"]))
        msgs = data.get("messages")
        if isinstance(msgs, list):  # content given as a list of text parts
            for m in msgs:
                if isinstance(m, dict) and isinstance(m.get("content"), list):
                    parts = m["content"]
                    if all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str) for x in parts):
                        m["content"] = "".join(x["text"] for x in parts)
    return data, errors, prompt_ids


def add_openai_routes(app, state, admission) -> list:
    """Add the routes; return the body models they validate with (for the OpenAPI document)."""
    def model_card():
        return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "llorch-cpud",
                "context_length": state.engine.model.n_ctx,
                "sampling_defaults": state.engine.sampling_defaults.describe()}

    @app.get("/v1/models")
    async def models():
        return json_response(200, {"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_name:
            return openai_errors([schemas.field_error("model", f"model {model_id!r} is not served here "
                                                               f"(this worker serves {state.model_name!r})", model_id)], 404)
        return json_response(200, model_card())

    chat_body = schemas.chat_body(state.config.limits)

    async def prepare(request, chat: bool):
        """(job, body, errors-response): validate everything, then queue the job."""
        endpoint = "chat_completions" if chat else "completions"
        data, errors, status = await read_json(request, state.config.limits)
        prompt_ids = None
        if not errors and not isinstance(data, dict):
            errors = [schemas.field_error("body", "expected a JSON object", None)]
        if not errors:
            data, errors, prompt_ids = _normalise(data, chat)
            body, more = schemas.validate(chat_body if chat else schemas.CompletionBody, data)
            errors += more
        if errors:
            state.metrics.request(endpoint, "invalid")
            return None, None, openai_errors(errors, status)
        if chat:
            try:
                prompt = apply_template(body)
            except InvalidRequest as e:
                state.metrics.request(endpoint, "invalid")
                return None, None, openai_errors([schemas.field_error("messages", str(e), None)])
        else:
            prompt = body.prompt
        ids = prompt_ids if prompt_ids is not None else await admission.tokenize(prompt)
        if chat and body.max_tokens is None:
            body.max_tokens = max(1, min(2048, admission.max_positions() - len(ids)))
        errors = admission.limit_errors(len(ids), body.max_tokens, prompt)
        grammar = None
        if not errors and body.response_format is not None:
            grammar, errors = await compile_constraint(state, "response_format", body.response_format.constraint(),
                                                       data.get("response_format"))
        if errors:
            state.metrics.request(endpoint, "invalid")
            return None, None, openai_errors(errors)
        prefix = "chatcmpl-" if chat else "cmpl-"
        if chat:
            k = (body.top_logprobs or 0) if body.logprobs else None
            echo_lp = False
        else:
            k = body.logprobs
            echo_lp = body.echo and (k is not None or body.max_tokens == 0)
        job = admission.submit(endpoint=endpoint, job_id=prefix + uuid.uuid4().hex[:24], prompt=prompt,
                               prompt_ids=ids, body=body, on_errors=openai_errors, logprobs=k,
                               prompt_logprobs=echo_lp, grammar=grammar, defaults=state.engine.sampling_defaults)
        if not isinstance(job, Job):
            return None, None, job
        if not chat and body.echo:  # the prompt as echoed: the text given, or the token ids decoded
            job.echo_text = prompt if prompt_ids is None else state.engine.tokenizer.decode(ids)
        return job, body, None

    def apply_template(body) -> str:
        return apply_chat_template(state.engine.tokenizer, [m.model_dump() for m in body.messages])

    async def collect(request, feed: JobFeed):
        """Wait for the whole generation (non-streaming), cancelling it if the client goes away."""
        pieces, end, error = [], None, None
        try:
            while end is None and error is None:
                batch = await feed.next_batch(0.5)
                if batch is None:
                    if await request.is_disconnected():
                        return None, None, None
                    continue
                for kind, ev in batch:
                    if kind == "token":
                        pieces.append(ev.text)
                    elif kind == "end":
                        end = ev
                    else:
                        error = ev
        finally:
            feed.close()
        return "".join(pieces), end, error

    def usage(end) -> dict:
        return {"prompt_tokens": len(end.prompt_ids), "completion_tokens": end.tokens_out,
                "total_tokens": len(end.prompt_ids) + end.tokens_out}

    def server_error(error: dict):
        status = 504 if error["code"] == "TIMEOUT" else 500
        return json_response(status, {"error": {"message": error["message"], "type": "server_error", "param": None,
                                                "code": error["code"]}})

    def wants_logprobs(body, chat: bool) -> bool:
        return bool(body.logprobs) if chat else body.logprobs is not None

    def logprobs_of(chat: bool, items, ids, start: int = 0, prompt_items=None, prompt_ids=()):
        """The choice's `logprobs` for generated entries `items` (and, echoed, the prompt's)."""
        texts = token_texts(state)
        if chat:
            return {"content": chat_logprobs(texts, items), "refusal": None}
        out = completion_logprobs(texts, list(items), list(ids), start)
        if prompt_items is not None:
            head = completion_logprobs(texts, list(prompt_items), list(prompt_ids), 0)
            out = {k: head[k] + out[k] for k in out}
        return out

    def stream_response(job, body, chat: bool, feed: JobFeed):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        want = wants_logprobs(body, chat)
        echo = not chat and body.echo

        def chunk(text: str | None, reason: str | None, end=None, role=False, logprobs=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
            if end is not None:
                choice["llorch_stop_reason"] = end.stop_reason
            c = {"id": job.job_id, "object": obj, "created": created, "model": state.model_name, "choices": [choice]}
            return ServerSentEvent(data=json.dumps(c, ensure_ascii=False))

        async def gen():
            sent, chars, echoed = 0, 0, not echo  # entries sent; characters of text sent; prompt echoed
            if chat:
                yield chunk("", None, role=True)
            async for kind, ev in feed.events():
                if not echoed and kind in ("token", "end"):  # the prompt (scored by now) comes first
                    echoed = True
                    text = job.echo_text
                    lp = None
                    if want:
                        lp = logprobs_of(False, [], [], prompt_items=job.seq.prompt_logprobs,
                                         prompt_ids=job.seq.prompt_ids)
                    yield chunk(text, None, logprobs=lp)
                    chars += len(text)
                if kind == "token":
                    lp = None
                    if want:
                        items = ev.logprobs or []
                        lp = logprobs_of(chat, items, [e.token_id for e in items], chars)
                        sent += len(items)
                    yield chunk(ev.text, None, logprobs=lp)
                    chars += len(ev.text)
                elif kind == "end":
                    lp = None
                    items = (ev.token_logprobs or [])[sent:]
                    if want and items:  # entries of tokens that released no text (a stop sequence's)
                        lp = logprobs_of(chat, items, [e.token_id for e in items], chars)
                    yield chunk(None if chat else "", finish_reason(ev.stop_reason), end=ev, logprobs=lp)
                    if include_usage:
                        yield ServerSentEvent(data=json.dumps({"id": job.job_id, "object": obj, "created": created,
                                                               "model": state.model_name, "choices": [],
                                                               "usage": usage(ev)}))
                else:
                    yield ServerSentEvent(data=json.dumps({"error": {"message": ev["message"], "type": "server_error",
                                                                     "param": None, "code": ev["code"]}}))
            yield ServerSentEvent(data="[DONE]")

        return sse_response(feed, gen(), job.job_id)

    async def complete(request: Request, chat: bool):
        job, body, error = await prepare(request, chat)
        if error is not None:
            return error
        feed = JobFeed(state, job)
        if body.stream:
            return stream_response(job, body, chat, feed)
        text, end, err = await collect(request, feed)
        if end is None and err is None:
            log("client went away", job_id=job.job_id)
            return json_response(499, {"error": {"message": "client closed request", "type": "server_error"}})
        if err is not None:
            return server_error(err)
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason(end.stop_reason),
                  "llorch_stop_reason": end.stop_reason}
        items = end.token_logprobs or []
        if chat:
            choice["message"] = {"role": "assistant", "content": end.text}
            if body.logprobs:
                choice["logprobs"] = logprobs_of(True, items, [])
        else:
            head = job.echo_text if body.echo else ""
            choice["text"] = head + end.text
            if body.logprobs is not None:
                choice["logprobs"] = logprobs_of(False, items, [e.token_id for e in items], len(head),
                                                 prompt_items=end.prompt_logprobs if body.echo else None,
                                                 prompt_ids=end.prompt_ids)
        return json_response(200, {
            "id": job.job_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": state.model_name, "choices": [choice], "usage": usage(end),
            "system_fingerprint": f"llorch-cpud-seed-{end.seed}",
        })

    ok = "a completion (JSON), or with stream: true an SSE stream of chunks ending with [DONE]"

    @app.post("/v1/completions", openapi_extra=schemas.openapi_body(schemas.CompletionBody),
              responses=schemas.openapi_responses(ok, 503, model=None))
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=schemas.openapi_body(chat_body),
              responses=schemas.openapi_responses(ok, 503, model=None))
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return [schemas.CompletionBody, chat_body]
