"""Candle (Hugging Face's Rust ML framework) through its official Python bindings (PyPI `candle-nn`).

Every stage is written in candle ops, float32 (what `candle.Tensor` and the model files hold):
`candle.nn.LayerNorm` (it wants 3-D input, so rows get a batch axis), `matmul`, `candle.functional
.softmax`, and GPT-2's tanh GELU built from `candle.functional.tanh` (candle's own `gelu` is the erf
form). The causal mask is applied with candle's `where_cond` (masked = -inf). The KV cache grows by
`candle.cat`; argmax is candle's `argmax_keepdim`.

Weights: GPT-2 from the folder's safetensors files through `candle.utils.load_safetensors` (candle's
own reader; our loader is not involved). Llama from the GGUF file through `candle.utils.load_gguf`
and candle's own `QTensor.dequantize()`; Q and K rows are un-permuted from GGUF's interleaved
rotary layout to the Hugging Face half-split layout (a pure reindexing), so RoPE is the
rotate-half form.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llorch_cpud.validate.references._framework import (FrameworkReference, GPT2Hparams, LlamaHparams, causal_mask_rows,
                                                        gpt2_key)
from llorch_cpud.validate.references.base import ReferenceUnavailable, available_module

GELU_C = math.sqrt(2.0 / math.pi)


def _candle():
    import candle

    return candle


def tensor(a: np.ndarray):
    """numpy -> candle float32."""
    return _candle().Tensor(np.ascontiguousarray(a, dtype=np.float32))


def to_np(t) -> np.ndarray:
    return np.asarray(t.values(), dtype=np.float32)


# ---------------------------------------------------------------- stages, in candle ops


def layer_norm(x, weight, bias, eps: float):
    """[rows, E] -> [rows, E] with candle.nn.LayerNorm (biased variance)."""
    import candle.nn

    ln = candle.nn.LayerNorm(x.shape[-1], eps=eps)
    ln.weight, ln.bias = weight, bias
    return ln(x.unsqueeze(0)).squeeze(0)


def rms_norm(x, weight, eps: float):
    """[rows, E] -> [rows, E]: x / sqrt(mean(x²) + eps) · weight."""
    ms = x.sqr().sum_keepdim(1) / float(x.shape[-1])
    return x.broadcast_div((ms + eps).sqrt()).broadcast_mul(weight)


def conv1d(x, weight, bias):
    """GPT-2 Conv1D: x @ W + b with W [in, out]."""
    return x.matmul(weight).broadcast_add(bias)


def qkv_projection(x, c_attn_weight, c_attn_bias, n_head: int):
    """[rows, E] -> 3 × [rows, H, hd]."""
    rows, e = x.shape
    qkv = conv1d(x, c_attn_weight, c_attn_bias)  # [rows, 3E]
    hd = e // n_head
    return tuple(qkv.narrow(1, i * e, e).contiguous().reshape((rows, n_head, hd)) for i in range(3))


def attention_scores(q, k_all, start: int, scale: float):
    """q [n, H, hd], k_all [Hkv, T, hd] -> [H, n, T]: Q·Kᵀ·scale, causal mask -inf (GQA: K repeated)."""
    candle = _candle()
    n, h, hd = q.shape
    hkv, total, _ = k_all.shape
    qh = q.transpose(0, 1).contiguous()  # [H, n, hd]
    kh = repeat_kv(k_all, h // hkv)  # [H, T, hd]
    scores = qh.matmul(kh.transpose(1, 2).contiguous()) * scale  # [H, n, T]
    mask = causal_mask_rows(start, n)
    if mask.any():
        m = candle.Tensor(mask.astype(np.uint32)).to_dtype(candle.u8).unsqueeze(0).broadcast_as((h, n, total))
        scores = m.where_cond(candle.tensor(float("-inf")).broadcast_as((h, n, total)), scores)
    return scores


def repeat_kv(x, groups: int):
    """[Hkv, T, hd] -> [Hkv·groups, T, hd], each KV head serving `groups` query heads in a row."""
    if groups == 1:
        return x.contiguous()
    hkv, t, hd = x.shape
    return x.unsqueeze(1).broadcast_as((hkv, groups, t, hd)).contiguous().reshape((hkv * groups, t, hd))


def attention_heads(scores, v_all):
    """softmax(scores) · V, merged: [H, n, T], [Hkv, T, hd] -> [n, H·hd]."""
    h, n, _ = scores.shape
    probs = _candle().functional.softmax(scores, -1)  # [H, n, T]
    heads = probs.matmul(repeat_kv(v_all, h // v_all.shape[0]))  # [H, n, hd]
    return heads.transpose(0, 1).contiguous().reshape((n, h * v_all.shape[2]))


def attention_output(scores, v_all, c_proj_weight, c_proj_bias):
    """GPT-2 checkpoint 5: softmax, weighted V, merged heads, output projection."""
    return conv1d(attention_heads(scores, v_all), c_proj_weight, c_proj_bias)


def gelu_tanh(x):
    """GPT-2's gelu_new from candle's tanh (candle.functional.gelu is the erf form)."""
    inner = (x + x * x * x * 0.044715) * GELU_C
    return x * 0.5 * (_candle().functional.tanh(inner) + 1.0)


def ffn(x, c_fc_weight, c_fc_bias, c_proj_weight, c_proj_bias):
    return conv1d(gelu_tanh(conv1d(x, c_fc_weight, c_fc_bias)), c_proj_weight, c_proj_bias)


def gpt2_block(x, w: dict, p: str, cfg: GPT2Hparams, layer: int, start: int, past, trace: dict | None):
    """One GPT-2 block. `past` is this layer's (k, v) [H, T0, hd] or None; returns (x, (k_all, v_all))."""
    candle = _candle()
    put = (lambda name, t: trace.__setitem__(name, t)) if trace is not None else (lambda name, t: None)
    put("block_in", x)
    h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.eps)
    put("ln_1", h)
    q, k, v = qkv_projection(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"], cfg.n_head)
    put("q", q), put("k", k), put("v", v)
    k_new, v_new = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()  # [H, n, hd]
    if past is not None:
        k_all, v_all = candle.cat([past[0], k_new], 1), candle.cat([past[1], v_new], 1)
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


# ---------------------------------------------------------------- Llama stages


def unpermute_rotary_rows(w, n_heads: int):
    """GGUF's rotary row order -> Hugging Face's, in candle ops: llama.cpp's converter wrote
    W_gguf = W_hf.reshape(h, 2, hd/2, in).swapaxes(1, 2); this is its inverse."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape((n_heads, hd // 2, 2, cols)).transpose(1, 2).contiguous().reshape((rows, cols))


def rope(x, cos, sin):
    """Rotate-half RoPE (HF layout): x [n, H, hd], cos/sin [n, 1, hd] -> [n, H, hd]."""
    candle = _candle()
    hd = x.shape[-1]
    x1, x2 = x.narrow(2, 0, hd // 2), x.narrow(2, hd // 2, hd // 2)
    rotated = candle.cat([x2 * -1.0, x1], 2)
    return x.broadcast_mul(cos) + rotated.broadcast_mul(sin)


def swiglu(x, gate_w, up_w, down_w):
    """Llama MLP: down(silu(gate(x)) · up(x)); weights [out, in]."""
    candle = _candle()
    g = x.matmul(gate_w.t())
    u = x.matmul(up_w.t())
    return (candle.functional.silu(g) * u).matmul(down_w.t())


class CandleReference(FrameworkReference):
    name = "candle"

    def __init__(self):
        available_module("candle")
        try:
            import candle  # noqa: F401
            import candle.nn  # noqa: F401
        except Exception as e:  # a broken native extension
            raise ReferenceUnavailable(f"candle: cannot import ({type(e).__name__}: {e})") from None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        v = {"candle-nn": version("candle-nn"), "dtype": "float32"}
        v["weights"] = getattr(self, "weights_source", "")
        return v

    # ------------------------------------------------------------- GPT-2

    def _load_gpt2(self, files: list[Path], cfg: GPT2Hparams) -> None:
        candle = _candle()
        w = {}
        for f in files:
            for name, t in candle.utils.load_safetensors(str(f)).items():
                key = gpt2_key(name)
                if key is not None:
                    w[key] = t if t.dtype == candle.f32 else t.to_dtype(candle.f32)
        self.w = w
        self.wte_t = w["wte.weight"].t().contiguous()  # [E, vocab]: the tied LM head
        self.weights_source = "model safetensors via candle.utils.load_safetensors"

    def _forward(self, ids, start, cache, trace):
        if self.family == "llama":
            return self._forward_llama(ids, start, cache, trace)
        candle, cfg, w = _candle(), self.cfg, self.w
        n = len(ids)
        tok = candle.Tensor(np.asarray(ids, dtype=np.uint32))
        pos = candle.Tensor(np.arange(start, start + n, dtype=np.uint32))
        x = w["wte.weight"].index_select(tok, 0) + w["wpe.weight"].index_select(pos, 0)  # [n, E]
        for i in range(cfg.n_layer):
            past = cache[i] if cache is not None and i < len(cache) else None
            x, kv = gpt2_block(x, w, f"h.{i}.", cfg, i, start, past, trace if i == 0 else None)
            if cache is not None:
                if i < len(cache):
                    cache[i] = kv
                else:
                    cache.append(kv)
        h = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], cfg.eps)
        return h.matmul(self.wte_t)  # [n, vocab]

    # ------------------------------------------------------------- Llama

    def _load_llama(self, model_path: Path, engine) -> None:
        candle = _candle()
        if model_path.suffix != ".gguf":
            raise ReferenceUnavailable("candle: Llama references load from a .gguf file")
        tensors, meta = candle.utils.load_gguf(str(model_path))
        self.lcfg = c = LlamaHparams.from_gguf_metadata(meta)
        w = {}
        for name, qt in tensors.items():
            t = qt.dequantize()  # candle's own dequantizer
            if t.dtype != candle.f32:
                t = t.to_dtype(candle.f32)
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                t = unpermute_rotary_rows(t, c.n_head if name.endswith("attn_q.weight") else c.n_kv_head)
            w[name] = t
        self.w = w
        self.head_t = w.get("output.weight", w["token_embd.weight"]).t().contiguous()  # [E, vocab]
        self.weights_source = "GGUF via candle.utils.load_gguf + QTensor.dequantize (candle's own dequantizer)"

    def _rope_tables(self, start: int, n: int):
        """cos, sin [n, 1, hd] for positions start..start+n, in candle ops (as transformers: float32
        inverse frequencies, angle = position · inv_freq, halves repeated)."""
        candle, c = _candle(), self.lcfg
        hd = c.head_dim
        exponent = tensor(np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))  # [hd/2]
        inv_freq = (exponent * math.log(c.rope_base)).exp().recip()  # base ** -(2i/hd)
        if "rope_freqs.weight" in self.w:
            inv_freq = inv_freq / self.w["rope_freqs.weight"]
        pos = tensor(np.arange(start, start + n, dtype=np.float32)) / float(c.rope_linear_factor)
        freqs = pos.reshape((n, 1)).matmul(inv_freq.reshape((1, hd // 2)))  # [n, hd/2]
        emb = candle.cat([freqs, freqs], 1)  # [n, hd]
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)

    def _forward_llama(self, ids, start, cache, trace):
        candle, c, w = _candle(), self.lcfg, self.w
        n = len(ids)
        put = (lambda name, t: trace.__setitem__(name, t)) if trace is not None else (lambda name, t: None)
        tok = candle.Tensor(np.asarray(ids, dtype=np.uint32))
        x = w["token_embd.weight"].index_select(tok, 0)  # [n, E]
        cos, sin = self._rope_tables(start, n)
        for i in range(c.n_layer):
            p = f"blk.{i}."
            tr = put if i == 0 else (lambda name, t: None)
            tr("block_in", x)
            h = rms_norm(x, w[p + "attn_norm.weight"], c.eps)
            tr("ln_1", h)
            q = h.matmul(w[p + "attn_q.weight"].t()).reshape((n, c.n_head, c.head_dim))
            k = h.matmul(w[p + "attn_k.weight"].t()).reshape((n, c.n_kv_head, c.head_dim))
            v = h.matmul(w[p + "attn_v.weight"].t()).reshape((n, c.n_kv_head, c.head_dim))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            tr("q", q), tr("k", k), tr("v", v)
            k_new, v_new = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
            past = cache[i] if cache is not None and i < len(cache) else None
            if past is not None:
                k_all, v_all = candle.cat([past[0], k_new], 1), candle.cat([past[1], v_new], 1)
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
            a = attention_heads(scores, v_all).matmul(w[p + "attn_output.weight"].t())
            tr("attn_out", a)
            x = x + a
            h = rms_norm(x, w[p + "ffn_norm.weight"], c.eps)
            tr("ln_2", h)
            f = swiglu(h, w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"])
            tr("ffn_out", f)
            x = x + f
            tr("block_out", x)
        h = rms_norm(x, w["output_norm.weight"], c.eps)
        return h.matmul(self.head_t)

    # ------------------------------------------------------------- read-back, argmax, softmax

    def _np(self, t) -> np.ndarray:
        return to_np(t)

    def _argmax_last(self, logits) -> int:
        last = logits.narrow(0, logits.shape[0] - 1, 1).squeeze(0)
        return int(last.argmax_keepdim(0).values()[0])

    def argmax(self, logits: np.ndarray) -> int:
        return int(tensor(logits).argmax_keepdim(0).values()[0])

    def softmax(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        candle = _candle()
        t = tensor(logits).to_dtype(candle.f64) / float(temperature)  # float64, as the engine's sampler
        return np.asarray(candle.functional.softmax(t, -1).values(), dtype=np.float64)


