"""Chat templates: the model's own Jinja template (from GGUF metadata or tokenizer_config.json), rendered sandboxed."""

from __future__ import annotations

from llorch_cpud.errors import InvalidRequest


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequest("chat: this model has no chat template")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}]: needs string 'role' and 'content'")

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tok = tokenizer.inner
    special = lambda i: tok.id_to_token(i) if i is not None else ""  # noqa: E731
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=special(tokenizer.bos_token_id),
            eos_token=special(tokenizer.eos_token_id),
        )
    except TemplateError as e:
        raise InvalidRequest(f"chat template: {e}") from None
