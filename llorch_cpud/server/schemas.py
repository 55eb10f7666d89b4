"""Request bodies (pydantic) and the one error shape every 400 uses.

`POST /execute` follows SPEC §4 exactly. Types are strict: `"0.5"` is not a number and
`2.0` is not an integer (an int is accepted where a float is expected). Unknown fields are
ignored — a pool manager may send more than this worker needs — but they are named in the
log line and in the `started` event (`ignored_fields`), so a typo (`max_token`) is visible.

Every failing field is reported, each as
`{"field", "constraint", "message", "value"}`: the field name (top-level; an error inside
`stop` or `messages` names the path, e.g. `messages[0].content`, in the message), the rule in
words, what is wrong, and the value received (long strings shortened, always valid JSON).

Before the models, `parse_json` holds a body to strict JSON (SPEC §4): UTF-8 only (no other
encoding, no lone surrogate escapes such as `"\ud800"`), no NaN/Infinity literals and no number
that overflows to infinity, integer literals of at most MAX_INT_DIGITS digits, nesting at most
MAX_DEPTH deep. Each violation is named by the top-level field that holds it (`body` when the
body itself is at fault). Size limits that an operator may change live in `Limits`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

U64_MAX = 2**64 - 1
JOB_ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
MAX_DEPTH = 16  # our bodies nest 4 deep (messages[i].content[j].text)
MAX_INT_DIGITS = 40  # uint64 needs 20


@dataclass(frozen=True)
class Limits:
    """Request size limits an operator may set (`serve --max-body-bytes ...`)."""

    max_body_bytes: int = 1 << 20  # the largest prompt (32768 characters, each a 12-byte escaped pair) is 393 KB
    max_messages: int = 128  # chat: messages per request
    max_chat_chars: int = 32768  # chat: characters of all messages' content together (as prompt's limit)


StopItem = Annotated[str, Field(min_length=1, max_length=100)]
JobId = Annotated[str, Field(min_length=1, max_length=128, pattern=JOB_ID_PATTERN)]

CONSTRAINTS = {
    "job_id": "1-128 characters from letters, digits and -_.:",
    "prompt": "string of 1-32768 characters",
    "max_tokens": "integer in [1, 2048]",
    "temperature": "number in [0.0, 2.0]",
    "seed": "integer in [0, 2^64-1] (uint64)",
    "top_p": "number in [0.0, 1.0]",
    "top_k": "integer >= 0 (0 = off)",
    "repetition_penalty": "number in [0.0, 2.0] (1.0 = off)",
    "min_p": "number in [0.0, 1.0] (0 = off)",
    "stop": "list of at most 4 strings, each 1-100 characters",
    "logprobs": "integer in [0, 20] (/execute, /v1/completions); boolean (/v1/chat/completions)",
    "top_logprobs": "integer in [0, 20], with logprobs: true",
    "echo": "boolean",
    "response_format": '{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}} '
                       '(json_schema: a JSON Schema that llguidance supports)',
    "json_schema": "a JSON Schema object that llguidance supports (structured output)",
    "grammar": "a Lark grammar (llguidance's dialect; structured output)",
    # OpenAI-compatible endpoints
    "messages": "non-empty list of {role, content} objects (limits: serve --max-messages, --max-chat-chars)",
    "n": "1 (one choice per request)",
    "stream": "boolean",
    "model": "string",
    "body": "a JSON object (strict JSON, UTF-8, application/json)",
}


class Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    max_tokens: Annotated[int, Field(ge=1, le=2048)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    seed: Annotated[int, Field(ge=0, le=U64_MAX)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    stop: Annotated[list[StopItem], Field(max_length=4)] = []


TopCount = Annotated[int, Field(ge=0, le=20)]
SchemaDoc = dict[str, Any] | bool  # a JSON Schema (compiled and checked by structured.py, which names what is unsupported)


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: SchemaDoc = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name", "schema"}')
        return self

    def constraint(self) -> tuple[str, Any] | None:
        """(kind, spec) for structured.Constraints.compile, or None for plain text."""
        if self.type == "json_object":
            return "json_object", None
        if self.type == "json_schema":
            return "json_schema", self.json_schema.schema_
        return None


class ExecuteBody(Sampling):
    job_id: JobId
    prompt: Annotated[str, Field(min_length=1, max_length=32768)]
    # An extra beyond SPEC's table, off by default: each token event carries its tokens' log-probabilities and
    # this many most likely alternatives (the model's distribution, before penalties and temperature).
    logprobs: TopCount | None = None
    # Structured output, also beyond SPEC's table: the generation is held to this JSON Schema, or to this Lark
    # grammar (at most one of the two; structured.py).
    json_schema: SchemaDoc | None = None
    grammar: Annotated[str, Field(min_length=1, max_length=65536)] | None = None

    @field_validator("grammar")
    @classmethod
    def one_constraint(cls, grammar, info):
        if grammar is not None and info.data.get("json_schema") is not None:
            raise ValueError("give json_schema or grammar, not both")
        return grammar

    def constraint(self) -> tuple[str, Any] | None:
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.grammar is not None:
            return "grammar", self.grammar
        return None


class CancelBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    job_id: JobId


class CompletionBody(Sampling):
    """OpenAI /v1/completions. `prompt` may be a string or a list holding one string; `stop` a string or a list."""

    prompt: Annotated[str, Field(min_length=1, max_length=32768)]
    max_tokens: Annotated[int, Field(ge=0, le=2048)] = 16  # 0 only with echo (score the prompt)
    stream: bool = False
    logprobs: TopCount | None = None
    echo: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1
    model: str | None = None
    stream_options: dict | None = None
    response_format: ResponseFormat | None = None


def chat_body(limits: Limits) -> type[BaseModel]:
    """The /v1/chat/completions body model for these limits."""

    class ChatMessage(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        role: Annotated[str, Field(max_length=64)]
        content: Annotated[str, Field(max_length=limits.max_chat_chars)]

    class ChatBody(Sampling):
        messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=limits.max_messages)]
        max_tokens: Annotated[int, Field(ge=1, le=2048)] | None = None  # default: what the context leaves, at most 2048
        stream: bool = False
        logprobs: bool = False
        top_logprobs: TopCount | None = None
        n: Annotated[int, Field(ge=1, le=1)] = 1
        model: str | None = None
        stream_options: dict | None = None
        response_format: ResponseFormat | None = None

        @field_validator("messages")
        @classmethod
        def total_content(cls, messages):
            total = sum(len(m.content) for m in messages)
            if total > limits.max_chat_chars:
                raise ValueError(f"the messages' content holds {total} characters together; "
                                 f"at most {limits.max_chat_chars}")
            return messages

    return ChatBody


ChatBody = chat_body(Limits())


class FieldError(BaseModel):
    field: str
    constraint: str
    message: str
    value: Any = None


class FieldErrors(BaseModel):
    """The body of a 4xx from /execute and /cancel: every failing field."""

    errors: list[FieldError]


STATUS_TEXT = {400: "invalid field(s)", 404: "no such job or model", 409: "job_id already queued or running",
               413: "body larger than --max-body-bytes", 415: "Content-Type is not application/json",
               503: "queue full (Retry-After) or not ready"}


def openapi_body(model: type[BaseModel]) -> dict:
    """A route's request body in the OpenAPI document (routes read and validate it themselves: app.read_json)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi_responses(ok: str, *statuses: int, model: type[BaseModel] | None = FieldErrors) -> dict:
    out: dict = {200: {"description": ok}}
    for status in (400, 413, 415, *statuses):
        out[status] = {"description": STATUS_TEXT[status]}
        if model is not None and status != 503:
            out[status]["model"] = model
    return out


def openapi_components(models: list[type[BaseModel]]) -> dict:
    """The JSON schemas of `models` (and the models they use) for the document's components."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


def field_error(field: str, message: str, value: Any = None, constraint: str | None = None) -> dict:
    return {"field": field, "constraint": constraint or CONSTRAINTS.get(field, ""), "message": message,
            "value": shorten(value)}


def shorten(value: Any, limit: int = 200) -> Any:
    """A short, JSON-serialisable rendering of a received value."""
    if isinstance(value, str):
        value = json_safe_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, HugeInt):
        return str(value)
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... ({len(value)} characters)"
    if isinstance(value, list) and len(value) > 20:
        return [shorten(v) for v in value[:20]] + [f"... ({len(value)} items)"]
    if isinstance(value, list):
        return [shorten(v) for v in value]
    if isinstance(value, dict):
        return {json_safe_text(str(k)): shorten(v) for k, v in list(value.items())[:20]}
    return value


def pydantic_errors(exc: ValidationError, data: dict) -> list[dict]:
    out, seen = [], set()
    for e in exc.errors(include_url=False):
        loc = e.get("loc") or ("body",)
        fieldname = str(loc[0])
        rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        if e["type"] == "missing":
            msg, value = f"{fieldname}{rest} is required", None
        else:
            msg = f"{fieldname}{rest}: {e['msg']}" if rest else e["msg"]
            value = data.get(fieldname) if isinstance(data, dict) else None
            if rest and "input" in e:
                value = e["input"]
        key = (fieldname, msg)
        if key in seen:
            continue
        seen.add(key)
        out.append(field_error(fieldname, msg, value))
    return out


FIELD_ORDER = ["body", "job_id", "prompt", "messages", "max_tokens", "temperature", "seed", "top_p", "top_k",
               "repetition_penalty", "min_p", "stop", "logprobs", "top_logprobs", "echo", "response_format", "json_schema", "grammar"]


def order(errors: list[dict]) -> list[dict]:
    """Errors in the order of SPEC §4's table (then anything else)."""
    rank = {f: i for i, f in enumerate(FIELD_ORDER)}
    return sorted(errors, key=lambda e: rank.get(e["field"], len(rank)))


def json_safe_text(s: str) -> str:
    """`s` with lone surrogates written as backslash escapes (so it can be encoded as UTF-8)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


class HugeInt:
    """An integer literal longer than MAX_INT_DIGITS, kept as its digit count (never converted)."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __str__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str):
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else HugeInt(text)


def parse_json(raw: bytes) -> tuple[Any, list[dict]]:
    """(value, []) for a strict-JSON body, or (None, errors)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [field_error("body", f"not valid UTF-8 (byte {e.start})", None)]
    try:
        data = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        return None, [field_error("body", f"not valid JSON: {e}", None)]
    except RecursionError:
        return None, [field_error("body", f"nested deeper than {MAX_DEPTH} levels", None)]
    errors = strict_json_errors(data)
    return (None, errors) if errors else (data, [])


def strict_json_errors(data: Any) -> list[dict]:
    """What json.loads accepts but SPEC's strict JSON does not, at most one error per top-level field."""
    errors: dict[str, dict] = {}
    stack = [(data, 1, None)]  # (value, depth, top-level field)
    while stack:
        value, depth, top = stack.pop()
        name = top or "body"
        if name in errors:
            continue
        problem = None
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                problem = f"nested deeper than {MAX_DEPTH} levels"
            else:
                items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
                for k, v in items:
                    if k is not None and json_safe_text(k) is not k:
                        problem = "a key holds a lone surrogate (not valid UTF-8 text)"
                        break
                    stack.append((v, depth + 1, top if top is not None else (k if isinstance(value, dict) else None)))
        elif isinstance(value, str):
            if json_safe_text(value) is not value:
                problem = "holds a lone surrogate escape (not valid UTF-8 text)"
        elif isinstance(value, float):
            if not math.isfinite(value):
                problem = "NaN, Infinity and numbers beyond the float range are not JSON numbers"
        elif isinstance(value, HugeInt):
            problem = f"integer literal of {value.digits} digits; at most {MAX_INT_DIGITS}"
        if problem:
            shown = None if isinstance(value, (dict, list)) else value
            errors[name] = field_error(json_safe_text(name), problem, shown, "strict JSON (SPEC §4)")
    return order(list(errors.values()))


def validate(model: type[BaseModel], data: Any) -> tuple[BaseModel | None, list[dict]]:
    """(parsed body, []) or (None, every error)."""
    if not isinstance(data, dict):
        return None, [field_error("body", f"expected a JSON object, got {type(data).__name__}", None)]
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, order(pydantic_errors(exc, data))


def unknown_fields(model: type[BaseModel], data: dict, also_known: tuple[str, ...] = ()) -> list[str]:
    known = set(model.model_fields) | set(also_known)
    return sorted(k for k in data if k not in known)


# ---------------------------------------------------------------------------- /tokenize, /detokenize (llama-server's shapes)

MAX_TOKENIZE_CHARS = 262144  # a few prompts' worth; the body limit (--max-body-bytes) applies first
MAX_DETOKENIZE_TOKENS = 65536

CONSTRAINTS.update({
    "content": f"string of at most {MAX_TOKENIZE_CHARS} characters",
    "add_special": "boolean (true: the tokens the engine gives a prompt, e.g. a BOS the model asks for)",
    "with_pieces": "boolean",
    "tokens": f"list of at most {MAX_DETOKENIZE_TOKENS} token ids, each in [0, vocabulary size)",
})


class TokenizeBody(BaseModel):
    """POST /tokenize: `{"content", "add_special": false, "with_pieces": false}` -> `{"tokens": [...]}`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    content: Annotated[str, Field(max_length=MAX_TOKENIZE_CHARS)]
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    """POST /detokenize: `{"tokens": [...]}` -> `{"content"}`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    tokens: Annotated[list[Annotated[int, Field(ge=0, le=U64_MAX)]], Field(max_length=MAX_DETOKENIZE_TOKENS)]
