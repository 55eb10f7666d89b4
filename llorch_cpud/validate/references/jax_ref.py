"""JAX (CPU, XLA), in float64.

Every stage is written in jax ops, executed eagerly: `jax.nn.standardize` (LayerNorm's normalisation,
two-pass variance) with the affine weight and bias, `jnp.matmul`, `jax.nn.softmax`, `jax.nn.gelu(
approximate=True)` (JAX's tanh GELU, GPT-2's gelu_new), `jax.nn.silu`, the causal mask with
`jnp.where` (masked = -inf), the KV cache grown with `jnp.concatenate`, argmax with `jnp.argmax`.
Attention is explicit matmuls: `jax.nn.dot_product_attention` is not float64-exact.

Why float64: the other references (transformers, candle, tinygrad) and our engine all compute in
float32, so any two of them differ by two float32 rounding histories. JAX in float64 is the
near-exact answer: its diff is our own float32 error alone, and a float32 artefact shared by every
float32 implementation would show up here. (This enables `jax_enable_x64` for the process.) The
tensors handed to the checkpoints are rounded to float32, so our stage functions run on float32
inputs exactly as in production.

Weights: GPT-2 from the folder's safetensors files through the safetensors library's numpy reader
(not our loader). Llama: JAX has no GGUF reader, so the dequantized float32 weights are taken from
our engine (`engine.model.tensors()`, Q/K rows already in the Hugging Face rotary layout) and its
config; the independence of dequantization is covered by candle and tinygrad, which dequantize
with their own code, and by the GGUF format tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llorch_cpud.validate.references._framework import FrameworkReference, GPT2Hparams, LlamaHparams, causal_mask_rows, gpt2_key
from llorch_cpud.validate.references.base import ReferenceUnavailable, available_module

DTYPE = "float64"


def _jax():
    import jax

    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return jax


def array(a: np.ndarray):
    jax = _jax()
    return jax.numpy.asarray(np.asarray(a, dtype=np.float64))


tensor = array  # the name the isolated runner uses for every framework


def to_np(t) -> np.ndarray:
    """float64 result, as float32 (what the checkpoints feed our float32 stage functions)."""
    return np.asarray(t, dtype=np.float64).astype(np.float32)


# ---------------------------------------------------------------- stages, in jax ops


def layer_norm(x, weight, bias, eps: float):
    jax = _jax()
    try:
        normed = jax.nn.standardize(x, axis=-1, epsilon=eps, algorithm="stable")
    except TypeError:  # older jax: one (mean-subtracted) algorithm only
        normed = jax.nn.standardize(x, axis=-1, epsilon=eps)
    return normed * weight + bias


def rms_norm(x, weight, eps: float):
    jax = _jax()
    jnp = jax.numpy
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * weight


def conv1d(x, weight, bias):
    return _jax().numpy.matmul(x, weight) + bias


def qkv_projection(x, c_attn_weight, c_attn_bias, n_head: int):
    jnp = _jax().numpy
    rows, e = x.shape
    q, k, v = jnp.split(conv1d(x, c_attn_weight, c_attn_bias), 3, axis=-1)
    hd = e // n_head
    return q.reshape(rows, n_head, hd), k.reshape(rows, n_head, hd), v.reshape(rows, n_head, hd)


def repeat_kv(x, groups: int):
    return x if groups == 1 else _jax().numpy.repeat(x, groups, axis=0)  # head h reads KV head h // groups


def attention_scores(q, k_all, start: int, scale: float):
    jnp = _jax().numpy
    n, h, _ = q.shape
    kh = repeat_kv(k_all, h // k_all.shape[0])
    scores = jnp.matmul(jnp.transpose(q, (1, 0, 2)), jnp.transpose(kh, (0, 2, 1))) * scale  # [H, n, T]
    mask = causal_mask_rows(start, n)
    if mask.any():
        scores = jnp.where(jnp.asarray(mask)[None], -jnp.inf, scores)
    return scores


def attention_heads(scores, v_all):
    jax = _jax()
    jnp = jax.numpy
    h, n, _ = scores.shape
    heads = jnp.matmul(jax.nn.softmax(scores, axis=-1), repeat_kv(v_all, h // v_all.shape[0]))  # [H, n, hd]
    return jnp.transpose(heads, (1, 0, 2)).reshape(n, h * v_all.shape[2])


def attention_output(scores, v_all, c_proj_weight, c_proj_bias):
    return conv1d(attention_heads(scores, v_all), c_proj_weight, c_proj_bias)


def gelu_tanh(x):
    return _jax().nn.gelu(x, approximate=True)


def ffn(x, c_fc_weight, c_fc_bias, c_proj_weight, c_proj_bias):
    return conv1d(gelu_tanh(conv1d(x, c_fc_weight, c_fc_bias)), c_proj_weight, c_proj_bias)


def gpt2_block(x, w: dict, p: str, cfg: GPT2Hparams, layer: int, start: int, past, trace: dict | None):
    jnp = _jax().numpy
    put = (lambda name, t: trace.__setitem__(name, t)) if trace is not None else (lambda name, t: None)
    put("block_in", x)
    h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.eps)
    put("ln_1", h)
    q, k, v = qkv_projection(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"], cfg.n_head)
    put("q", q), put("k", k), put("v", v)
    k_new, v_new = jnp.transpose(k, (1, 0, 2)), jnp.transpose(v, (1, 0, 2))
    if past is not None:
        k_all, v_all = jnp.concatenate([past[0], k_new], axis=1), jnp.concatenate([past[1], v_new], axis=1)
    else:
        k_all, v_all = k_new, v_new
    put("k_all", k_all), put("v_all", v_all)
    scores = attention_scores(q, k_all, start, cfg.attn_scale(layer))
    put("scores", scores)
    a = attention_output(scores, v_all, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
    put("attn_out", a)
    x = x + a
    h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], cfg.eps)
    put("ln_2", h)
    f = ffn(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"], w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    put("ffn_out", f)
    x = x + f
    put("block_out", x)
    return x, (k_all, v_all)


def rope(x, cos, sin):
    """Rotate-half RoPE: x [n, H, hd], cos/sin [n, 1, hd]."""
    jnp = _jax().numpy
    hd = x.shape[-1]
    return x * cos + jnp.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], axis=-1) * sin


def swiglu(x, gate_w, up_w, down_w):
    """Llama MLP with weights given as [in, out]: down(silu(gate(x)) · up(x))."""
    jax = _jax()
    jnp = jax.numpy
    return jnp.matmul(jax.nn.silu(jnp.matmul(x, gate_w)) * jnp.matmul(x, up_w), down_w)


class JaxReference(FrameworkReference):
    name = "jax"

    def __init__(self):
        available_module("jax")
        available_module("jaxlib")
        try:
            jax = _jax()
            jax.numpy.zeros(1).block_until_ready()
        except Exception as e:
            raise ReferenceUnavailable(f"jax: cannot run on CPU ({type(e).__name__}: {e})") from None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        jax = _jax()
        return {"jax": version("jax"), "jaxlib": version("jaxlib"), "backend": jax.default_backend(),
                "dtype": f"{DTYPE} (results rounded to float32 for the checkpoints)",
                "weights": getattr(self, "weights_source", "")}

    def _load_gpt2(self, files: list[Path], cfg: GPT2Hparams) -> None:
        from safetensors.numpy import load_file

        w = {}
        for f in files:
            for name, a in load_file(str(f)).items():
                key = gpt2_key(name)
                if key is not None:
                    w[key] = array(a)
        self.w = w
        self.head_t = w["wte.weight"].T  # [E, vocab]: the tied LM head, transposed once
        self.weights_source = "model safetensors via safetensors.numpy.load_file, as float64"

    def _forward(self, ids, start, cache, trace):
        if self.family == "llama":
            return self._forward_llama(ids, start, cache, trace)
        jnp = _jax().numpy
        cfg, w = self.cfg, self.w
        n = len(ids)
        x = jnp.take(w["wte.weight"], jnp.asarray(ids), axis=0) + w["wpe.weight"][start : start + n]
        for i in range(cfg.n_layer):
            past = cache[i] if cache is not None and i < len(cache) else None
            x, kv = gpt2_block(x, w, f"h.{i}.", cfg, i, start, past, trace if i == 0 else None)
            if cache is not None:
                if i < len(cache):
                    cache[i] = kv
                else:
                    cache.append(kv)
        h = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], cfg.eps)
        return jnp.matmul(h, self.head_t)

    # ------------------------------------------------------------- Llama (weights from our engine)

    def _load_llama(self, model_path: Path, engine) -> None:
        if engine is None or engine.model.family != "llama":
            raise ReferenceUnavailable("jax: the Llama reference takes dequantized weights from the engine's Llama model")
        mc = engine.model.config
        self.lcfg = LlamaHparams(n_layer=mc.n_layer, n_embd=mc.n_embd, n_head=mc.n_head, n_kv_head=mc.n_kv_head,
                                 head_dim=mc.head_dim, n_ff=mc.n_ff, eps=mc.rms_norm_eps, rope_base=mc.rope_base,
                                 rope_linear_factor=mc.rope_linear_factor)
        # [out, in] weights stored transposed once ([in, out]), so a projection is x @ W_t
        dense = {name: engine.model.dense(name) for name in engine.model.tensors()}  # quantized ones dequantized
        self.w = {name: array(a.T if a.ndim == 2 else a) for name, a in dense.items()}
        self.embed = array(dense["token_embd.weight"])  # [vocab, E]
        self.freq_factors = None
        if "rope_freqs.weight" in dense:
            self.freq_factors = array(dense["rope_freqs.weight"])
        self.weights_source = ("dequantized float32 weights from llorch's engine (Q/K in HF rotary layout), as float64; "
                               "dequantization independence is checked by candle/tinygrad and the GGUF tests")

    def _rope_tables(self, start: int, n: int):
        jnp = _jax().numpy
        c, hd = self.lcfg, self.lcfg.head_dim
        inv_freq = 1.0 / (c.rope_base ** (jnp.arange(0, hd, 2, dtype=jnp.float64) / hd))
        if self.freq_factors is not None:
            inv_freq = inv_freq / self.freq_factors
        pos = jnp.arange(start, start + n, dtype=jnp.float64) / c.rope_linear_factor
        freqs = jnp.outer(pos, inv_freq)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb)[:, None, :], jnp.sin(emb)[:, None, :]

    def _forward_llama(self, ids, start, cache, trace):
        jnp = _jax().numpy
        c, w = self.lcfg, self.w
        n = len(ids)
        x = jnp.take(self.embed, jnp.asarray(ids), axis=0)
        cos, sin = self._rope_tables(start, n)
        for i in range(c.n_layer):
            p = f"blk.{i}."
            tr = (lambda name, t: trace.__setitem__(name, t)) if (trace is not None and i == 0) else (lambda name, t: None)
            tr("block_in", x)
            h = rms_norm(x, w[p + "attn_norm.weight"], c.eps)
            tr("ln_1", h)
            q = jnp.matmul(h, w[p + "attn_q.weight"]).reshape(n, c.n_head, c.head_dim)
            k = jnp.matmul(h, w[p + "attn_k.weight"]).reshape(n, c.n_kv_head, c.head_dim)
            v = jnp.matmul(h, w[p + "attn_v.weight"]).reshape(n, c.n_kv_head, c.head_dim)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            tr("q", q), tr("k", k), tr("v", v)
            past = cache[i] if cache is not None and i < len(cache) else None
            k_new, v_new = jnp.transpose(k, (1, 0, 2)), jnp.transpose(v, (1, 0, 2))
            if past is not None:
                k_all, v_all = jnp.concatenate([past[0], k_new], axis=1), jnp.concatenate([past[1], v_new], axis=1)
            else:
                k_all, v_all = k_new, v_new
            if cache is not None:
                if i < len(cache):
                    cache[i] = (k_all, v_all)
                else:
                    cache.append((k_all, v_all))
            tr("k_all", k_all), tr("v_all", v_all)
            scores = attention_scores(q, k_all, start, 1.0 / math.sqrt(c.head_dim))
            tr("scores", scores)
            a = jnp.matmul(attention_heads(scores, v_all), w[p + "attn_output.weight"])
            tr("attn_out", a)
            x = x + a
            h = rms_norm(x, w[p + "ffn_norm.weight"], c.eps)
            tr("ln_2", h)
            f = swiglu(h, w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"])
            tr("ffn_out", f)
            x = x + f
            tr("block_out", x)
        h = rms_norm(x, w["output_norm.weight"], c.eps)
        return jnp.matmul(h, w.get("output.weight", w["token_embd.weight"]))

    # ------------------------------------------------------------- read-back, argmax, softmax

    def _np(self, t) -> np.ndarray:
        return to_np(t)

    def _argmax_last(self, logits) -> int:
        return int(_jax().numpy.argmax(logits[-1]))

    def argmax(self, logits: np.ndarray) -> int:
        return int(_jax().numpy.argmax(array(logits)))

    def softmax(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        jax = _jax()
        return np.asarray(jax.nn.softmax(array(logits) / float(temperature), axis=-1), dtype=np.float64)
