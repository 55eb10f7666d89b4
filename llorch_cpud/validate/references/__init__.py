"""Reference implementations, by name. Each module is imported only when asked for."""

from __future__ import annotations

import importlib

from llorch_cpud.validate.references.base import Reference, ReferenceUnavailable

REGISTRY = {
    "transformers": ("llorch_cpud.validate.references.transformers_ref", "TransformersReference"),
    "candle": ("llorch_cpud.validate.references.candle_ref", "CandleReference"),
    "tinygrad": ("llorch_cpud.validate.references.tinygrad_ref", "TinygradReference"),
    "jax": ("llorch_cpud.validate.references.jax_ref", "JaxReference"),
    "llamacpp": ("llorch_cpud.validate.references.llamacpp_ref", "LlamaCppReference"),
}


def known() -> list[str]:
    return list(REGISTRY)


def make(name: str) -> Reference:
    """An instance of the named reference; ReferenceUnavailable if it cannot run here."""
    if name not in REGISTRY:
        raise KeyError(name)
    module, cls = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ReferenceUnavailable(f"{name}: {e}") from None
    return getattr(mod, cls)()
