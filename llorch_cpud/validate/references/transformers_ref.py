"""PyTorch + Hugging Face transformers: the canonical GPT-2 and Llama code, run as a whole model.

Intermediate tensors are captured from transformers' own modules with forward hooks; Q, K, V
and the pre-softmax scores are captured by wrapping the modeling module's
`eager_attention_forward` (and, during it, `softmax`), so nothing of ours is re-implemented
in torch. GGUF files load through `from_pretrained(folder, gguf_file=name)`, which
dequantizes to float32.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import numpy as np

from llorch_cpud.validate.references.base import CacheSnapshot, Reference, ReferenceUnavailable, available_module

# Where each family keeps block 0's parts.
LAYOUT = {
    "gpt2": dict(layers="transformer.h", ln_1="ln_1", ln_2="ln_2", attn="attn", mlp="mlp",
                 modeling="transformers.models.gpt2.modeling_gpt2"),
    "llama": dict(layers="model.layers", ln_1="input_layernorm", ln_2="post_attention_layernorm", attn="self_attn",
                  mlp="mlp", modeling="transformers.models.llama.modeling_llama"),
}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF loader draws a tqdm bar that `disable_progress_bar()` does not reach; silence it."""
    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable=None, *a, **k: iterable
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


class TransformersReference(Reference):
    name = "transformers"

    def __init__(self):
        available_module("torch")
        available_module("transformers")
        import torch

        self.torch = torch
        self.model = None

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}

    def load(self, model_path: Path, family: str, engine) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if family not in LAYOUT:
            raise ReferenceUnavailable(f"transformers reference has no layout for family {family!r}")
        self.family = family
        self.layout = LAYOUT[family]
        kwargs = dict(attn_implementation="eager", dtype=self.torch.float32)
        model_path = Path(model_path)
        if model_path.suffix == ".gguf":
            available_module("gguf")
            with _no_gguf_progress_bar():
                self.model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                                  **kwargs)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        self.model.eval()
        self.modeling = importlib.import_module(self.layout["modeling"])

    @contextlib.contextmanager
    def _hooks(self, store: dict):
        torch, L = self.torch, self.layout
        block0 = _get(self.model, L["layers"])[0]
        handles = []

        def pre_block(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            store.setdefault("block_in", _np(x[0]))

        def out_hook(name):
            def hook(mod, args, out):
                store.setdefault(name, _np(_first(out)[0]))

            return hook

        handles.append(block0.register_forward_pre_hook(pre_block, with_kwargs=True))
        handles.append(block0.register_forward_hook(out_hook("block_out")))
        handles.append(_get(block0, L["ln_1"]).register_forward_hook(out_hook("ln_1")))
        handles.append(_get(block0, L["ln_2"]).register_forward_hook(out_hook("ln_2")))
        handles.append(_get(block0, L["attn"]).register_forward_hook(out_hook("attn_out")))
        handles.append(_get(block0, L["mlp"]).register_forward_hook(out_hook("ffn_out")))

        original_attn = self.modeling.eager_attention_forward
        original_softmax = torch.nn.functional.softmax

        def capture_attention(module, query, key, value, attention_mask, *args, **kwargs):
            if "q" in store:  # only block 0 (the first call)
                return original_attn(module, query, key, value, attention_mask, *args, **kwargs)

            def softmax_capture(x, *a, **k):
                store.setdefault("scores", _np(x[0]))  # [H, n, T]
                return original_softmax(x, *a, **k)

            store["q"] = _np(query[0].transpose(0, 1))  # [1, H, n, hd] -> [n, H, hd]
            store["k_all"] = _np(key[0])  # [1, Hkv, T, hd] -> [Hkv, T, hd]
            store["v_all"] = _np(value[0])
            store["k"] = store["k_all"].transpose(1, 0, 2)[-query.shape[2] :]  # [n, Hkv, hd]
            store["v"] = store["v_all"].transpose(1, 0, 2)[-query.shape[2] :]
            torch.nn.functional.softmax = softmax_capture
            try:
                return original_attn(module, query, key, value, attention_mask, *args, **kwargs)
            finally:
                torch.nn.functional.softmax = original_softmax

        self.modeling.eager_attention_forward = capture_attention
        try:
            yield
        finally:
            self.modeling.eager_attention_forward = original_attn
            torch.nn.functional.softmax = original_softmax
            for h in handles:
                h.remove()

    def capture(self, prompt_ids: list[int]) -> dict[str, np.ndarray]:
        store: dict[str, np.ndarray] = {}
        ids = self.torch.tensor([prompt_ids])
        with self.torch.no_grad(), self._hooks(store):
            out = self.model(input_ids=ids, use_cache=False)
        store["logits"] = _np(out.logits[0])
        return store

    @staticmethod
    def _layer0(cache):
        if hasattr(cache, "layers"):
            return cache.layers[0].keys, cache.layers[0].values
        if hasattr(cache, "key_cache"):
            return cache.key_cache[0], cache.value_cache[0]
        return cache[0][0], cache[0][1]

    @staticmethod
    def _cache_of(out):
        return out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.x

    def _cache_kwarg(self) -> str:
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def cache(self, prompt_ids: list[int], next_token: int) -> CacheSnapshot:
        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            kv = self._cache_of(out)
            k, v = self._layer0(kv)
            k_prompt, v_prompt = _np(k[0]), _np(v[0])  # copies: the cache object is updated in place
            out2 = self.model(input_ids=torch.tensor([[next_token]]), use_cache=True, **{self._cache_kwarg(): kv})
            k, v = self._layer0(self._cache_of(out2))
        return CacheSnapshot(k_prompt, v_prompt, _np(k[0]), _np(v[0]))

    def greedy(self, prompt_ids: list[int], n_tokens: int, eos_token_id: int | None) -> list[int]:
        torch = self.torch
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=n_tokens,
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=eos_token_id if eos_token_id is not None else 0,
            )
        return out[0, len(prompt_ids) :].tolist()

    def argmax(self, logits: np.ndarray) -> int:
        return int(self.torch.argmax(self.torch.from_numpy(logits)))

    def softmax(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        t = self.torch.from_numpy(logits.astype(np.float64))
        return self.torch.softmax(t / temperature, dim=-1).numpy()
