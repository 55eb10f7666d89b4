"""Structured-output fields (`response_format` on the OpenAI routes, `json_schema` / `grammar` on /execute) to
a compiled grammar, or the 400 error naming the field and what the constraint library does not support."""

from __future__ import annotations

import asyncio

from llorch_cpud.errors import InvalidRequest
from llorch_cpud.server import schemas
from llorch_cpud.structured import Grammar


async def compile_constraint(state, field: str, constraint, value) -> tuple[Grammar | None, list[dict]]:
    """(grammar or None, []) or (None, [the field's error]). `constraint` is (kind, spec) or None; compiled off the
    event loop (the first one builds llguidance's view of the tokenizer, ~0.3 s)."""
    if constraint is None:
        return None, []
    try:
        return await asyncio.to_thread(state.engine.constraints.compile, *constraint), []
    except InvalidRequest as e:
        return None, [schemas.field_error(field, str(e), value)]
