"""What the framework-built references (candle, tinygrad, jax) share: reading the model's own files,
and the capture / cache / greedy drivers around a framework's forward pass.

Nothing here computes a number: every stage (norms, projections, RoPE, attention, softmax, GELU,
SwiGLU, the LM head, argmax) is written in each framework's own ops in its module. What is shared is
only bookkeeping: which files hold the weights (read with the framework's or the safetensors
library's loader, never through llorch_cpud.formats), the config, and the loops that turn one
`_forward` into the interface's capture / cache / greedy calls.

A subclass implements:
    _load_gpt2(files: list[Path], cfg: GPT2Hparams)    weights from the safetensors files
    _load_llama(model_path, engine)                    optional; else Llama is reported unavailable
    _forward(ids, start, cache, trace) -> logits       framework tensor [n, vocab]; `cache` is a list
                                                       the forward appends layer K/V to (or None),
                                                       `trace` a dict for block-0 tensors (or None)
    _decode_cache(prompt_cache, capacity)              optional: the cache greedy() decodes with
    _np(tensor) -> np.ndarray
    _argmax_last(logits) -> int                        argmax of the last row, in the framework
    argmax(np logits) -> int, softmax(np logits, T) -> np.ndarray
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llorch_cpud.validate.references.base import CacheSnapshot, Reference, ReferenceUnavailable

# Names the trace must hold after a prompt pass (base.py documents layouts); k_all / v_all are
# block 0's whole cache [n_kv_head, T, head_dim].
TRACE_NAMES = ("block_in", "ln_1", "q", "k", "v", "k_all", "v_all", "scores", "attn_out", "ln_2", "ffn_out",
               "block_out")

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # transformers' names for the tanh approximation


@dataclass(frozen=True)
class GPT2Hparams:
    """The GPT-2 hyper-parameters, read from config.json by the reference itself."""

    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    vocab_size: int
    n_positions: int
    eps: float
    scale_attn_weights: bool
    scale_by_inverse_layer_idx: bool

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attn_scale(self, layer: int) -> float:
        s = 1.0 / float(self.head_dim) ** 0.5 if self.scale_attn_weights else 1.0
        return s / float(layer + 1) if self.scale_by_inverse_layer_idx else s


def read_gpt2_folder(folder: Path) -> tuple[GPT2Hparams, list[Path]]:
    """config.json and the safetensors file list of a Hugging Face GPT-2 folder (single or sharded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReferenceUnavailable(f"{folder}: not a Hugging Face folder")
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    act = raw.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        raise ReferenceUnavailable(f"activation_function {act!r} is not GPT-2's tanh GELU")
    n_embd = int(raw.get("n_embd", 768))
    cfg = GPT2Hparams(
        n_layer=int(raw.get("n_layer", 12)),
        n_embd=n_embd,
        n_head=int(raw.get("n_head", 12)),
        n_inner=int(raw.get("n_inner") or 4 * n_embd),
        vocab_size=int(raw.get("vocab_size", 50257)),
        n_positions=int(raw.get("n_positions", 1024)),
        eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
        scale_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
    )
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [folder / n for n in dict.fromkeys(weight_map.values())]
    else:
        raise ReferenceUnavailable(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return cfg, files


def gpt2_key(name: str) -> str | None:
    """A checkpoint tensor name as the GPT-2 references key it ('transformer.h.0...' -> 'h.0...');
    None for tensors a forward pass does not use (attention-mask buffers, the tied lm_head)."""
    if name.startswith("transformer."):
        name = name[len("transformer.") :]
    if name.endswith((".attn.bias", ".attn.masked_bias")) or name.startswith("lm_head."):
        return None
    return name


@dataclass(frozen=True)
class LlamaHparams:
    """Llama-family hyper-parameters, read from the GGUF metadata by the reference itself."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_ff: int
    eps: float
    rope_base: float
    rope_linear_factor: float

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "LlamaHparams":
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ReferenceUnavailable(f"GGUF architecture {arch!r} is not Llama")
        a = arch + "."
        n_embd, n_head = int(meta[a + "embedding_length"]), int(meta[a + "attention.head_count"])
        head_dim = int(meta.get(a + "attention.key_length", n_embd // n_head))
        scaling = meta.get(a + "rope.scaling.type") or "none"
        if scaling not in ("none", "linear"):
            raise ReferenceUnavailable(f"rope scaling {scaling!r} is not implemented in the references")
        return cls(
            n_layer=int(meta[a + "block_count"]),
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=int(meta.get(a + "attention.head_count_kv", n_head)),
            head_dim=head_dim,
            n_ff=int(meta[a + "feed_forward_length"]),
            eps=float(meta[a + "attention.layer_norm_rms_epsilon"]),
            rope_base=float(meta.get(a + "rope.freq_base", 10000.0)),
            rope_linear_factor=float(meta.get(a + "rope.scaling.factor") or 1.0) if scaling == "linear" else 1.0,
        )


def causal_mask_rows(start: int, n: int) -> np.ndarray:
    """[n, start + n] bool, True where query row i (absolute position start + i) must not see key j.
    Only the index pattern is built here; each framework applies it with its own `where`."""
    total = start + n
    return np.arange(total)[None, :] > (start + np.arange(n))[:, None]


class FrameworkReference(Reference):
    """capture / cache / greedy around a framework's `_forward`."""

    family = "gpt2"
    weights_source = ""  # said in versions(): where the weights came from

    # ------------------------------------------------------------- loading

    def load(self, model_path: Path, family: str, engine) -> None:
        self.family = family
        self.model_path = Path(model_path)
        if family == "gpt2":
            self.cfg, files = read_gpt2_folder(self.model_path)
            self._load_gpt2(files, self.cfg)
        elif family == "llama":
            self._load_llama(self.model_path, engine)
        else:
            raise ReferenceUnavailable(f"{self.name}: no implementation for model family {family!r}")

    def _load_gpt2(self, files: list[Path], cfg: GPT2Hparams) -> None:
        raise NotImplementedError

    def _load_llama(self, model_path: Path, engine) -> None:
        raise ReferenceUnavailable(f"{self.name}: the Llama family is not implemented in this reference")

    # ------------------------------------------------------------- the interface

    def _prefill(self, prompt_ids: list[int]):
        """(logits, per-layer cache, block-0 trace) of the prompt: one pass, shared by capture, cache and
        greedy (the reference is deterministic and independent of our engine)."""
        key = tuple(int(t) for t in prompt_ids)
        if getattr(self, "_last_prefill", None) is None or self._last_prefill[0] != key:
            self._last_prefill = None  # free the previous one first
            trace: dict = {}
            cache: list = []
            logits = self._forward(list(key), 0, cache, trace)
            self._last_prefill = (key, logits, cache, trace)
        return self._last_prefill[1:]

    def capture(self, prompt_ids: list[int]) -> dict[str, np.ndarray]:
        logits, _, trace = self._prefill(prompt_ids)
        out = {name: self._np(trace[name]) for name in TRACE_NAMES}
        out["logits"] = self._np(logits)
        return out

    def cache(self, prompt_ids: list[int], next_token: int) -> CacheSnapshot:
        _, prompt_cache, _ = self._prefill(prompt_ids)
        cache = list(prompt_cache)  # the forward replaces entries: the prefill's list stays as it was
        k_prompt, v_prompt = self._np(cache[0][0]), self._np(cache[0][1])
        self._forward([int(next_token)], len(prompt_ids), cache, None)
        return CacheSnapshot(k_prompt, v_prompt, self._np(cache[0][0]), self._np(cache[0][1]))

    def greedy(self, prompt_ids: list[int], n_tokens: int, eos_token_id: int | None) -> list[int]:
        logits, prompt_cache, _ = self._prefill(prompt_ids)
        cache = self._decode_cache(prompt_cache, len(prompt_ids) + n_tokens)
        pos, out = len(prompt_ids), []
        for _ in range(n_tokens):
            tok = self._argmax_last(logits)
            out.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            if len(out) == n_tokens:
                break
            logits = self._forward([tok], pos, cache, None)
            pos += 1
        return out

    # ------------------------------------------------------------- for subclasses

    def _decode_cache(self, prompt_cache: list, capacity: int) -> list:
        """The cache greedy() decodes with, from the prompt's (capacity: prompt + new tokens); by default
        a copy of the growing list."""
        return list(prompt_cache)

    def _forward(self, ids: list[int], start: int, cache: list | None, trace: dict | None):
        raise NotImplementedError

    def _np(self, t) -> np.ndarray:
        raise NotImplementedError

    def _argmax_last(self, logits) -> int:
        raise NotImplementedError
