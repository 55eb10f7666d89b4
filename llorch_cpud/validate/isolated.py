"""`llorch-cpud validate --isolated`: the seed's experiment, one command, no model file.

Each component of a GPT-2 block runs alone on synthetic inputs, in our engine (the very stage
functions of `llorch_cpud.models.gpt2`, looked up at call time so an injected bug shows) and in every
installed reference, and the outputs are compared the way the seed's report did: first values,
mean, std, min, max, max abs diff against ours, tolerance, PASS/FAIL, and whether ours is
bit-exact across two runs.

Inputs, all deterministic (no random generator):
- LayerNorm: exactly the seed's — x[i, j] = sin((i·1024 + j)·0.001)·0.5, shape [2, 1024], weight
  ones, bias zeros, eps 1e-5.
- QKV, attention scores, attention output, FFN, block: GPT-2 Medium's width (1024, 16 heads of 64),
  5 positions. Activations and weights are `wave()` arrays: sin of a quadratic integer phase, so
  matrices have full rank and no RNG is involved; the block's input is the seed's formula on 5 rows.

References, each built from its framework's own modules / ops:
- transformers: torch.nn.LayerNorm, transformers' Conv1D, `eager_attention_forward` (pre-softmax
  scores captured from it), GPT2MLP, GPT2Block (eager attention, causal mask) with these weights;
- candle, tinygrad, jax: the stage functions of their reference modules (the same code that serves
  `validate --references`), jax in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import llorch_cpud.models.gpt2 as gpt2
from llorch_cpud.cache import KVCache
from llorch_cpud.formats.hf import GPT2_NAMES
from llorch_cpud.models.base import Segment
from llorch_cpud.validate.references._framework import GPT2Hparams
from llorch_cpud.validate.references.base import ReferenceUnavailable, available_module
from llorch_cpud.validate.report import versions_section
from llorch_cpud.validate.report import write as report_files
from llorch_cpud.validate.runner import base_versions

E, H, SEQ_LN, SEQ = 1024, 16, 2, 5
HD = E // H
EPS = 1e-5
MASKED = -1e30


# ---------------------------------------------------------------- inputs


def seed_input(rows: int, cols: int = 1024) -> np.ndarray:
    """The seed's LayerNorm input: x[i, j] = sin((i·1024 + j)·0.001)·0.5 (computed in float64, stored float32)."""
    i = np.arange(rows, dtype=np.float64)[:, None]
    j = np.arange(cols, dtype=np.float64)[None, :]
    return (np.sin((i * 1024 + j) * 0.001) * 0.5).astype(np.float32)


def wave(shape, salt: int, scale: float, offset: float = 0.0) -> np.ndarray:
    """Deterministic full-rank pseudo-random values: offset + scale·sin(2π·phase/q), where phase is a
    quadratic function of the flat index in exact integer arithmetic (q prime)."""
    q = 1_000_003
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.int64)
    phase = ((i * i) % q * (7919 + 104_729 * salt) + i * (31 * salt + 17)) % q
    return (offset + scale * np.sin(2.0 * math.pi * phase.astype(np.float64) / q)).astype(np.float32).reshape(shape)


def causal_scores(scores: np.ndarray) -> np.ndarray:
    """Synthetic scores [H, n, n] with the causal mask applied (masked = -inf)."""
    n = scores.shape[1]
    out = scores.copy()
    out[:, np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
    return out


@dataclass
class Inputs:
    x_ln: np.ndarray
    ln_w: np.ndarray
    ln_b: np.ndarray
    h: np.ndarray  # [SEQ, E] stage input of QKV and FFN
    c_attn_w: np.ndarray
    c_attn_b: np.ndarray
    q: np.ndarray  # [SEQ, H, HD]
    k: np.ndarray  # [H, SEQ, HD]
    v: np.ndarray  # [H, SEQ, HD]
    scores: np.ndarray  # [H, SEQ, SEQ], masked
    c_proj_w: np.ndarray
    c_proj_b: np.ndarray
    fc_w: np.ndarray
    fc_b: np.ndarray
    mlp_proj_w: np.ndarray
    mlp_proj_b: np.ndarray
    x_block: np.ndarray  # [SEQ, E]
    block_w: dict  # GPT-2 names, layer 0


def make_inputs() -> Inputs:
    c_attn_w, c_attn_b = wave((E, 3 * E), 1, 0.05), wave((3 * E,), 2, 0.02)
    c_proj_w, c_proj_b = wave((E, E), 3, 0.05), wave((E,), 4, 0.02)
    fc_w, fc_b = wave((E, 4 * E), 5, 0.05), wave((4 * E,), 6, 0.02)
    mlp_proj_w, mlp_proj_b = wave((4 * E, E), 7, 0.03), wave((E,), 8, 0.02)
    block_w = {
        "h.0.ln_1.weight": wave((E,), 9, 0.1, 1.0), "h.0.ln_1.bias": wave((E,), 10, 0.05),
        "h.0.attn.c_attn.weight": c_attn_w, "h.0.attn.c_attn.bias": c_attn_b,
        "h.0.attn.c_proj.weight": c_proj_w, "h.0.attn.c_proj.bias": c_proj_b,
        "h.0.ln_2.weight": wave((E,), 11, 0.1, 1.0), "h.0.ln_2.bias": wave((E,), 12, 0.05),
        "h.0.mlp.c_fc.weight": fc_w, "h.0.mlp.c_fc.bias": fc_b,
        "h.0.mlp.c_proj.weight": mlp_proj_w, "h.0.mlp.c_proj.bias": mlp_proj_b,
    }
    return Inputs(
        x_ln=seed_input(SEQ_LN), ln_w=np.ones(E, np.float32), ln_b=np.zeros(E, np.float32),
        h=wave((SEQ, E), 13, 1.0),
        c_attn_w=c_attn_w, c_attn_b=c_attn_b,
        q=wave((SEQ, H, HD), 14, 1.0), k=wave((H, SEQ, HD), 15, 1.0), v=wave((H, SEQ, HD), 16, 1.0),
        scores=causal_scores(wave((H, SEQ, SEQ), 17, 2.0)),
        c_proj_w=c_proj_w, c_proj_b=c_proj_b, fc_w=fc_w, fc_b=fc_b, mlp_proj_w=mlp_proj_w, mlp_proj_b=mlp_proj_b,
        x_block=seed_input(SEQ), block_w=block_w,
    )


@dataclass(frozen=True)
class Component:
    id: int
    key: str
    name: str
    tolerance: float
    inputs: str


COMPONENTS = [
    Component(1, "layer_norm", "LayerNorm", 1e-5,
              "x[i, j] = sin((i·1024 + j)·0.001)·0.5 [2, 1024]; weight ones, bias zeros, eps 1e-5"),
    Component(2, "qkv", "QKV projection", 1e-4, "h wave [5, 1024]; c_attn wave [1024, 3072]; 16 heads; output q, k, v stacked"),
    Component(4, "scores", "attention scores", 1e-4, "q wave [5, 16, 64], k wave [16, 5, 64]; scale 1/8, causal mask"),
    Component(5, "attn_out", "attention output", 1e-4, "masked scores wave [16, 5, 5], v wave [16, 5, 64]; c_proj wave [1024, 1024]"),
    Component(6, "ffn", "FFN output", 1e-4, "h wave [5, 1024]; c_fc [1024, 4096], tanh GELU, c_proj [4096, 1024]"),
    Component(7, "block", "block output", 1e-4, "x = seed formula [5, 1024]; all block-0 weights wave; eps 1e-5"),
]


# ---------------------------------------------------------------- our side: the engine's own stage functions


def ours(key: str, I: Inputs) -> np.ndarray:
    if key == "layer_norm":
        return gpt2.layer_norm(I.x_ln, I.ln_w, I.ln_b, EPS)
    if key == "qkv":
        return np.stack(gpt2.qkv_projection(I.h, I.c_attn_w, I.c_attn_b, H))
    if key == "scores":
        return gpt2.attention_scores(I.q.copy(), I.k.copy(), 0)
    if key == "attn_out":
        return gpt2.attention_output(I.scores.copy(), I.v, I.c_proj_w, I.c_proj_b)
    if key == "ffn":
        return gpt2.ffn(I.h, I.fc_w, I.fc_b, I.mlp_proj_w, I.mlp_proj_b)
    if key == "block":
        cfg = gpt2.GPT2Config(n_embd=E, n_head=H, n_layer=1, n_positions=64)
        cache = KVCache.allocate(1, H, SEQ, HD)
        blk = gpt2.GPT2Block(**{GPT2_NAMES["h.{i}." + name[len("h.0."):]]: w for name, w in I.block_w.items()})
        return gpt2.block(I.x_block.copy(), blk, 0, cfg, [Segment(cache, 0, SEQ)])
    raise KeyError(key)


# ---------------------------------------------------------------- the references


class TransformersSide:
    name, label = "transformers", "transformers"
    note = "torch.nn.LayerNorm, transformers Conv1D / eager_attention_forward / GPT2MLP / GPT2Block, float32"

    def __init__(self):
        available_module("torch")
        available_module("transformers")
        import torch
        from transformers import GPT2Config

        self.torch = torch
        self.config = GPT2Config(n_embd=E, n_head=H, n_layer=1, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0, layer_norm_epsilon=EPS, activation_function="gelu_new")
        self.config._attn_implementation = "eager"

    def _t(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def _mask(self, n):  # transformers' additive causal mask [1, 1, n, n]
        torch = self.torch
        m = torch.zeros(n, n)
        m.masked_fill_(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), torch.finfo(torch.float32).min)
        return m[None, None]

    def _conv1d(self, w, b):
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(w.shape[1], w.shape[0])
        with self.torch.no_grad():
            layer.weight.copy_(self._t(w))
            layer.bias.copy_(self._t(b))
        return layer

    def run(self, key: str, I: Inputs) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            return self._run(key, I).detach().numpy().astype(np.float64)

    def _run(self, key: str, I: Inputs):
        torch = self.torch
        if key == "layer_norm":
            ln = torch.nn.LayerNorm(E, eps=EPS)
            ln.weight.copy_(self._t(I.ln_w))
            ln.bias.copy_(self._t(I.ln_b))
            return ln(self._t(I.x_ln))
        if key == "qkv":
            q, k, v = self._conv1d(I.c_attn_w, I.c_attn_b)(self._t(I.h)).split(E, dim=-1)
            return torch.stack([t.view(SEQ, H, HD) for t in (q, k, v)])
        if key == "scores":
            import transformers.models.gpt2.modeling_gpt2 as modeling

            captured = {}
            softmax = torch.nn.functional.softmax

            def capture(x, *a, **kw):
                captured["scores"] = x.clone()
                return softmax(x, *a, **kw)

            module = torch.nn.Module().eval()
            q = self._t(I.q).transpose(0, 1)[None]  # [1, H, n, hd]
            k = self._t(I.k)[None]
            torch.nn.functional.softmax = capture
            try:
                modeling.eager_attention_forward(module, q, k, torch.zeros_like(k), self._mask(SEQ), scaling=HD**-0.5)
            finally:
                torch.nn.functional.softmax = softmax
            return captured["scores"][0]
        if key == "attn_out":
            probs = torch.softmax(self._t(I.scores), dim=-1)  # [H, n, n]
            heads = torch.matmul(probs, self._t(I.v)).transpose(0, 1).reshape(SEQ, E)
            return self._conv1d(I.c_proj_w, I.c_proj_b)(heads)
        if key == "ffn":
            from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

            mlp = GPT2MLP(4 * E, self.config).eval()
            mlp.load_state_dict({"c_fc.weight": self._t(I.fc_w), "c_fc.bias": self._t(I.fc_b),
                                 "c_proj.weight": self._t(I.mlp_proj_w), "c_proj.bias": self._t(I.mlp_proj_b)})
            return mlp(self._t(I.h))
        if key == "block":
            from transformers.models.gpt2.modeling_gpt2 import GPT2Block

            block = GPT2Block(self.config, layer_idx=0).eval()
            state = {k[len("h.0."):]: self._t(v) for k, v in I.block_w.items()}
            missing, unexpected = block.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith(("attn.bias", "attn.masked_bias"))]
            if missing or unexpected:
                raise RuntimeError(f"GPT2Block weights: missing {missing}, unexpected {unexpected}")
            out = block(self._t(I.x_block)[None], attention_mask=self._mask(SEQ))
            out = out[0] if isinstance(out, (tuple, list)) else out
            return out[0]
        raise KeyError(key)


class _FrameworkSide:
    """candle / tinygrad / jax: the stage functions of the reference module."""

    module: str
    name = label = note = ""

    def __init__(self):
        import importlib

        self.m = importlib.import_module(self.module)
        self.check()

    def check(self):
        raise NotImplementedError

    def t(self, a):
        return self.m.tensor(a)

    def back(self, t) -> np.ndarray:
        return self.m.to_np(t).astype(np.float64)

    def run(self, key: str, I: Inputs) -> np.ndarray:
        m, t = self.m, self.t
        if key == "layer_norm":
            return self.back(m.layer_norm(t(I.x_ln), t(I.ln_w), t(I.ln_b), EPS))
        if key == "qkv":
            return np.stack([self.back(x) for x in m.qkv_projection(t(I.h), t(I.c_attn_w), t(I.c_attn_b), H)])
        if key == "scores":
            return self.back(m.attention_scores(t(I.q), t(I.k), 0, 1.0 / math.sqrt(HD)))
        if key == "attn_out":
            return self.back(m.attention_output(t(I.scores), t(I.v), t(I.c_proj_w), t(I.c_proj_b)))
        if key == "ffn":
            return self.back(m.ffn(t(I.h), t(I.fc_w), t(I.fc_b), t(I.mlp_proj_w), t(I.mlp_proj_b)))
        if key == "block":
            cfg = GPT2Hparams(n_layer=1, n_embd=E, n_head=H, n_inner=4 * E, vocab_size=1, n_positions=64, eps=EPS,
                              scale_attn_weights=True, scale_by_inverse_layer_idx=False)
            w = {k: t(v) for k, v in I.block_w.items()}
            out, _ = m.gpt2_block(t(I.x_block), w, "h.0.", cfg, 0, 0, None, None)
            return self.back(out)
        raise KeyError(key)


class CandleSide(_FrameworkSide):
    module, name, label = "llorch_cpud.validate.references.candle_ref", "candle", "candle"
    note = "candle-nn Python bindings: candle.nn.LayerNorm, matmul, functional.softmax/tanh, float32"

    def check(self):
        self.m.CandleReference()


class TinygradSide(_FrameworkSide):
    module, name, label = "llorch_cpud.validate.references.tinygrad_ref", "tinygrad", "tinygrad (f64)"
    note = "tinygrad CPU (clang) in float64: nn.LayerNorm, matmul, softmax, gelu (tanh)"

    def check(self):
        self.m.check_runnable()

    def back(self, t) -> np.ndarray:
        return t.numpy().astype(np.float64)  # unrounded float64


class JaxSide(_FrameworkSide):
    module, name, label = "llorch_cpud.validate.references.jax_ref", "jax", "jax (f64)"
    note = "jax CPU in float64: nn.standardize, matmul, nn.softmax, nn.gelu(approximate=True)"

    def check(self):
        self.m.JaxReference()

    def back(self, t) -> np.ndarray:
        return np.asarray(t, dtype=np.float64)  # unrounded float64: the near-exact value


SIDES = {"transformers": TransformersSide, "candle": CandleSide, "tinygrad": TinygradSide, "jax": JaxSide}


# ---------------------------------------------------------------- comparing


def stats(a: np.ndarray) -> dict:
    """first values, and mean/std/min/max over the unmasked finite entries (masked: -inf or <= -1e30)."""
    a = np.asarray(a, dtype=np.float64)
    keep = np.isfinite(a) & (a > MASKED)
    finite = a[keep]
    f = (lambda fn: float(fn(finite))) if finite.size else (lambda fn: None)
    return {
        "first": [float(x) for x in a.ravel()[:3]],
        "mean": f(np.mean), "std": f(np.std), "min": f(np.min), "max": f(np.max),
        "nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum()), "masked": int((~keep & ~np.isnan(a)).sum()),
    }


def compare(ours_out: np.ndarray, ref_out: np.ndarray) -> tuple[float, str]:
    """Max abs diff; masked positions (-inf, or at most -1e30) must agree and are left out."""
    if ours_out.shape != ref_out.shape:
        return math.inf, f"shape mismatch: ours {list(ours_out.shape)}, reference {list(ref_out.shape)}"
    o, r = ours_out.astype(np.float64), ref_out.astype(np.float64)
    if np.isnan(o).any() or np.isnan(r).any():
        return math.inf, "NaN in output"
    om, rm = o <= MASKED, r <= MASKED
    if not np.array_equal(om, rm):
        return math.inf, f"masked positions differ at {int((om != rm).sum())} entries"
    keep = ~om
    note = "masked positions agree; compared where unmasked" if om.any() else ""
    return (float(np.abs(o[keep] - r[keep]).max()) if keep.any() else 0.0), note


def run_isolated(references: list[str] | None = None, log=print) -> dict:
    """Every component against every installed reference; returns the report dict."""
    names = references or list(SIDES)
    sides, skipped = {}, {}
    for name in names:
        try:
            sides[name] = SIDES[name]()
        except ReferenceUnavailable as e:
            skipped[name] = str(e)
        except Exception as e:  # an installed framework that cannot run here
            skipped[name] = f"{type(e).__name__}: {e}"
    I = make_inputs()
    components, results = [], []
    for comp in COMPONENTS:
        t0 = time.perf_counter()
        a, b = ours(comp.key, I), ours(comp.key, I)
        deterministic = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        entry = {"id": comp.id, "name": comp.name, "inputs": comp.inputs, "tolerance": comp.tolerance,
                 "shape": list(a.shape), "ours": stats(a), "ours_dtype": str(a.dtype), "deterministic": deterministic}
        for name, side in sides.items():
            try:
                out = side.run(comp.key, I)
                diff, note = compare(a, out)
                passed = diff <= comp.tolerance
                row_stats = {"ours": entry["ours"], "reference": stats(out)}
                status = "pass" if passed else "fail"
            except Exception as e:
                diff, note, passed, row_stats, status = None, f"{type(e).__name__}: {e}", False, {"ours": entry["ours"]}, "error"
            results.append({"id": comp.id, "name": comp.name, "reference": name, "shape": list(a.shape),
                            "max_abs_diff": diff if diff is None or math.isfinite(diff) else str(diff),
                            "tolerance": comp.tolerance, "passed": passed, "status": status, "stats": row_stats,
                            "note": note})
        components.append(entry)
        log(f"isolated {comp.name}: {time.perf_counter() - t0:.1f}s")
    versions = base_versions()
    for name, side in sides.items():
        versions[f"{name}/implementation"] = side.note
    versions.update(_framework_versions(sides))
    ran = list(sides)
    passed = bool(ran) and all(r["passed"] for r in results) and all(c["deterministic"] for c in components)
    return {"mode": "isolated", "references": ran, "labels": {n: s.label for n, s in sides.items()},
            "skipped": skipped, "components": components, "results": results, "versions": versions,
            "passed": passed}


def _framework_versions(sides: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    pkgs = {"transformers": ("torch", "transformers"), "candle": ("candle-nn",), "tinygrad": ("tinygrad",),
            "jax": ("jax", "jaxlib")}
    out = {}
    for name in sides:
        for pkg in pkgs.get(name, ()):
            try:
                out[f"{name}/{pkg}"] = version(pkg)
            except PackageNotFoundError:
                pass
    return out


# ---------------------------------------------------------------- the seed's table


def _num(x, width=8) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    if x <= MASKED:
        return f"{x:.3g}"
    return f"{x:.{width}f}"


def _diff(r: dict) -> str:
    d = r["max_abs_diff"]
    if d is None:
        return "ERROR"
    return d if isinstance(d, str) else f"{d:.2e}"


def component_rows(report: dict, comp: dict) -> list[list[str]]:
    refs = report["references"]
    by = {r["reference"]: r for r in report["results"] if r["id"] == comp["id"]}
    head = ["", "llorch-cpud"] + [report["labels"].get(n, n) for n in refs]
    rows = [head]
    cols = [comp["ours"]] + [by[n]["stats"].get("reference", {}) for n in refs]
    for i in range(3):
        rows.append([f"first[{i}]"] + [_num(c["first"][i]) if c.get("first") else "-" for c in cols])
    for key in ("mean", "std", "min", "max"):
        rows.append([key] + [_num(c.get(key)) for c in cols])
    rows.append(["max abs diff", "-"] + [_diff(by[n]) for n in refs])
    rows.append(["tolerance", "-"] + [f"{comp['tolerance']:g}" for _ in refs])
    rows.append(["result", "bit-exact x2" if comp["deterministic"] else "NOT DETERMINISTIC"]
                + [by[n]["status"].upper() for n in refs])
    return rows


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(report: dict) -> str:
    out = []
    for comp in report["components"]:
        out.append(f"== {comp['id']}. {comp['name']}  {comp['shape']}  tolerance {comp['tolerance']:g}")
        out.append(f"   input: {comp['inputs']}")
        out.append(_grid(component_rows(report, comp)))
        notes = [f"   {r['reference']}: {r['note']}" for r in report["results"]
                 if r["id"] == comp["id"] and r["note"] and r["status"] != "pass"]
        out.extend(notes)
        out.append("")
    for name, reason in report["skipped"].items():
        out.append(f"skipped {name}: {reason}")
    return "\n".join(out)


def markdown(report: dict) -> str:
    out = ["# llorch-cpud isolated component validation", "",
           "Each component alone on deterministic synthetic inputs (no model file), our engine's stage "
           "function against every installed reference. Weights are synthetic: this proves the stage "
           "arithmetic, not real weights.", "",
           f"- references: {', '.join(report['references']) or 'none'}"]
    for name, reason in report["skipped"].items():
        out.append(f"- skipped reference {name}: {reason}")
    out.append(f"- result: **{'PASS' if report['passed'] else 'FAIL'}**")
    out.append("")
    for comp in report["components"]:
        out.append(f"## {comp['id']}. {comp['name']} — tolerance {comp['tolerance']:g}")
        out.append("")
        out.append(f"Input: {comp['inputs']}; output shape {comp['shape']}.")
        out.append("")
        rows = component_rows(report, comp)
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "---|" * len(rows[0]))
        for r in rows[1:]:
            out.append("| " + " | ".join(r) + " |")
        for r in report["results"]:
            if r["id"] == comp["id"] and r["note"]:
                out.append(f"\n- {r['reference']}: {r['note']}")
        out.append("")
    return "\n".join(out + versions_section(report)) + "\n"


def write(report: dict, folder: Path) -> tuple[Path, Path]:
    return report_files(report, folder, markdown(report))


def main(report_dir: Path | None = None, log=None) -> int:
    """The `validate --isolated` command: prints the tables, writes reports if asked, 0 only if all pass."""
    import sys

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    report = run_isolated(log=log)
    print(table(report))
    if report_dir is not None:
        j, m = write(report, report_dir)
        print(f"reports: {j} {m}")
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"{verdict}: {len(COMPONENTS)} components x {len(report['references'])} references "
          f"({', '.join(report['references']) or 'none installed'}) in {time.perf_counter() - t0:.1f}s")
    return 0 if report["passed"] else 1
