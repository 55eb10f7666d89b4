"""Request bodies (pydantic) and the one error shape every 400 uses.

`POST /execute` follows SPEC §4 exactly. Types are strict: `"0.5"` is not a number and
`2.0` is not an integer (an int is accepted where a float is expected). Unknown fields are
ignored — a pool manager may send more than this worker needs — but they are named in the
log line and in the `started` event (`ignored_fields`), so a typo (`max_token`) is visible.

Every failing field is reported, each as
`{"field", "constraint", "message", "value"}`: the field name (top-level; an error inside
`stop` names the item index in the message), the rule in words, what is wrong, and the
value received (long strings shortened).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

U64_MAX = 2**64 - 1

StopItem = Annotated[str, Field(min_length=1, max_length=100)]

CONSTRAINTS = {
    "job_id": "non-empty string",
    "prompt": "string of 1-32768 characters",
    "max_tokens": "integer in [1, 2048]",
    "temperature": "number in [0.0, 2.0]",
    "seed": "integer in [0, 2^64-1] (uint64)",
    "top_p": "number in [0.0, 1.0]",
    "top_k": "integer >= 0 (0 = off)",
    "repetition_penalty": "number in [0.0, 2.0] (1.0 = off)",
    "min_p": "number in [0.0, 1.0] (0 = off)",
    "stop": "list of at most 4 strings, each 1-100 characters",
    # OpenAI-compatible endpoints
    "messages": "non-empty list of {role, content} objects",
    "n": "1 (one choice per request)",
    "stream": "boolean",
    "model": "string",
    "body": "a JSON object",
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


class ExecuteBody(Sampling):
    job_id: Annotated[str, Field(min_length=1)]
    prompt: Annotated[str, Field(min_length=1, max_length=32768)]


class CompletionBody(Sampling):
    """OpenAI /v1/completions. `prompt` may be a string or a list holding one string; `stop` a string or a list."""

    prompt: Annotated[str, Field(min_length=1, max_length=32768)]
    max_tokens: Annotated[int, Field(ge=1, le=2048)] = 16
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1
    model: str | None = None
    stream_options: dict | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str


class ChatBody(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=2048)] | None = None  # default: what the context leaves, at most 2048
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1
    model: str | None = None
    stream_options: dict | None = None


def field_error(field: str, message: str, value: Any = None, constraint: str | None = None) -> dict:
    return {"field": field, "constraint": constraint or CONSTRAINTS.get(field, ""), "message": message,
            "value": shorten(value)}


def shorten(value: Any, limit: int = 200) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... ({len(value)} characters)"
    if isinstance(value, list) and len(value) > 20:
        return [shorten(v) for v in value[:20]] + [f"... ({len(value)} items)"]
    if isinstance(value, list):
        return [shorten(v) for v in value]
    if isinstance(value, dict):
        return {k: shorten(v) for k, v in list(value.items())[:20]}
    return value


def pydantic_errors(exc: ValidationError, data: dict) -> list[dict]:
    out, seen = [], set()
    for e in exc.errors(include_url=False):
        loc = e.get("loc") or ("body",)
        fieldname = str(loc[0])
        rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        if e["type"] == "missing":
            msg, value = f"{fieldname} is required", None
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
               "repetition_penalty", "min_p", "stop"]


def order(errors: list[dict]) -> list[dict]:
    """Errors in the order of SPEC §4's table (then anything else)."""
    rank = {f: i for i, f in enumerate(FIELD_ORDER)}
    return sorted(errors, key=lambda e: rank.get(e["field"], len(rank)))


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
