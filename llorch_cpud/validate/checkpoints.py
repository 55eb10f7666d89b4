"""The twelve checkpoints (SPEC §2): each stage of our forward pass against each reference, on every path.

Stage checkpoints (1, 2, 4-7) are first isolated: our stage function gets the reference's own
input to that stage and its output is compared with the reference's output, so an error
shows up at the stage that makes it, not downstream. Checkpoints 3 and 8-12 run our engine
as it runs in production (cache, full forward, selection, sampling, the generation loop).
Then every checkpoint is taken again at decode positions, on each decode path (validate/decode.py:
the reference's greedy tokens fed through the production step, alone, traced, as a row of a batch,
on one thread, and served greedy): the block-0 stage tensors that code computed (1-7), the cache it
wrote (3), the logits it served (8), their bit-identity across runs (9) and its picks (10). Each
checkpoint's result is the worst of its parts; `paths` lists every part with the path behind it.

A reference that cannot expose a quantity (its capture() lacks a block-0 tensor, or its cache()
raises NotAvailable, as llama.cpp's API does) gets status "n/a" at the checkpoints that need it:
not compared, not counted as a failure, the reason in the note. A reference's declared tolerance
profile (`Reference.tolerances`, e.g. llama.cpp's 8-bit activations) replaces SPEC's checkpoint-8
tolerance for that reference only, and is stated in the note next to SPEC's value.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from llorch_cpud.engine import Engine, Request
from llorch_cpud.models.base import PATH_NAMES, Segment
import llorch_cpud.sampling as sampling
from llorch_cpud.sampling import SamplingParams
from llorch_cpud.validate.decode import BATCHED
from llorch_cpud.validate.references.base import NotAvailable


def tol_text(x: float) -> str:
    """A tolerance as SPEC writes it: 1e-3 as "1e-3", 1.5 as "1.5"."""
    if x and abs(math.log10(abs(x))) >= 3:
        m, e = f"{x:e}".split("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"
    return f"{x:g}"


# id -> (name, tolerance). Names for the norm depend on the family.
CHECKPOINTS = {
    1: ("{norm}", 1e-5),
    2: ("QKV projection", 1e-4),
    3: ("KV cache", 1e-4),
    4: ("attention scores", 1e-4),
    5: ("attention output", 1e-4),
    6: ("FFN output", 1e-4),
    7: ("block output", 1e-4),
    8: ("full logits", 1e-3),
    9: ("selected logits", 0.0),
    10: ("argmax sampling", 0.0),
    11: ("softmax probabilities", 1e-6),
    12: ("end to end", 0.0),
}
NORM_NAME = {"gpt2": "LayerNorm", "llama": "RMSNorm"}

# Our own numerics modes (formats.load_model's numerics): "float32" (the default) is held to SPEC's tolerances;
# "q8" quantizes the activations of every quantized product to 8 bits per 32-block (llama.cpp's scheme),
# and keeps the KV cache in float16 (llama.cpp's too), which moves the projections, cache, FFN, block and
# logits by design. Its profile replaces SPEC's tolerance at
# those checkpoints against every reference (a reference's own larger declared tolerance still wins).
# Measured on SmolLM2-135M Q4_1 over 20 prompts (scripts/numerics_tolerances.py, the figures in
# tests/data/numerics_tolerances.json): max 0.047 (2, 3), 0.0069 (5), 0.50 (6), 0.44 (7), 2.02 (8).
# Checkpoints 1, 4 (no quantized product), 9-12 (our own rows, the tie rules at 8's tolerance) keep SPEC's.
NUMERICS_TOLERANCES = {"q8": {2: 0.1, 3: 0.1, 5: 0.02, 6: 1.0, 7: 1.0, 8: 4.0}}
NUMERICS_REASON = {"q8": "q8 numerics tolerance (8-bit activations)"}
# At decode positions the stage tensors are the step's own (its inputs are our earlier stages, not the reference's),
# so under q8 the 8-bit products before a stage move it too: scores and attention output get their own profile there.
NUMERICS_DECODE_TOLERANCES = {"q8": {4: 0.5, 5: 0.1}}
# Which block-0 tensors each stage checkpoint compares at decode rows (validate/decode.py)
# (7: the FFN's input norm too, the residual stream after attention: a fault in that residual shows there, and
# checkpoint 6 compares the FFN only where its input agrees - see decode_parts).
DECODE_STAGES = {1: ("ln_1",), 2: ("q", "k", "v"), 4: ("scores",), 5: ("attn_out",), 6: ("ffn_out",),
                 7: ("ln_2", "block_out")}
SOFTMAX_TEMPERATURES = (0.5, 1.0, 1.5)
MASKED = -1e30  # a reference's masked score is at most this (transformers uses finfo.min)


def stats(a) -> dict:
    a = np.asarray(a, dtype=np.float64)
    finite = a[np.isfinite(a)]
    flat = a.ravel()
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "nan": int(np.isnan(a).sum()),
        "inf": int(np.isinf(a).sum()),
        "first": [float(x) for x in flat[:5]],
    }


def max_abs_diff(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
    if np.isnan(ours).any() or np.isnan(ref).any():
        return math.inf
    return float(np.abs(ours - ref).max()) if ours.size else 0.0


@dataclass
class Result:
    id: int
    name: str
    reference: str
    shape: list
    max_abs_diff: float | None
    tolerance: float
    passed: bool
    status: str  # pass | fail | tie | error | n/a (the reference cannot expose it: not compared)
    stats: dict = field(default_factory=dict)
    note: str = ""
    path: str = ""  # the code that computed "ours"
    paths: list = field(default_factory=list)  # every part of a combined result: path, shape, diff, status, note

    def to_json(self) -> dict:
        d = asdict(self)
        if d["max_abs_diff"] is not None and not math.isfinite(d["max_abs_diff"]):
            d["max_abs_diff"] = str(d["max_abs_diff"])
        return d


class OurSide:
    """Everything our engine computes for the prompt, computed once and shared by all references.

    A part that raises (an injected bug can make a stage crash) is recorded, and the
    checkpoints that need it fail with that error instead of stopping the whole run."""

    def __init__(self, engine: Engine, prompt_ids: list[int], n_tokens: int):
        self.engine, self.ids, self.n_tokens = engine, prompt_ids, n_tokens
        self.errors: dict[str, str] = {}
        self._try("logits", self._full_logits)
        self._try("selected", self._selected)
        self._try("cache", self._cache)
        self._try("greedy", self._greedy)

    def _try(self, part: str, fn) -> None:
        try:
            fn()
        except Exception as e:
            self.errors[part] = f"{type(e).__name__}: {e}"

    def need(self, part: str) -> None:
        if part in self.errors:
            raise RuntimeError(f"our {part} computation failed: {self.errors[part]}")

    def _full_logits(self):  # checkpoint 8: every position, with the block-0 trace of the same pass
        self.trace: dict = {}
        self.full_logits = self.engine.prefill_logits(self.ids, self.trace)  # [seq, vocab]

    def _selected(self):  # checkpoints 9, 10: the engine's own prefill step and greedy pick
        def first_token(keep_logits: bool):
            seq = self.engine.start(Request(prompt_ids=self.ids, max_tokens=1, sampling=SamplingParams(temperature=0.0), seed=0))
            seq.keep_logits = keep_logits
            self.engine.step([seq])
            if seq.error is not None:
                raise RuntimeError(seq.error.message)
            return seq
        seq = first_token(True)  # the full logits the sampler sees (checkpoint 9), and the sampler's pick
        self.selected = seq.last_logits  # [vocab]
        self.token_sampler = seq.generated[0]
        self.token = first_token(False).generated[0]  # the pick a served greedy request gets (the head screen's)

    def _cache(self):  # checkpoint 3: the cache after the prompt, then after one more token
        model, n = self.engine.model, len(self.ids)
        token = self.token if "selected" not in self.errors else self.ids[-1]
        cache = model.new_cache(n + 1)
        self.trace_prompt: dict = {}
        model.forward(np.array(self.ids), [Segment(cache, 0, n)], self.trace_prompt)
        self.k_prompt, self.v_prompt = cache.k[0, :, :n].copy(), cache.v[0, :, :n].copy()  # [Hkv, n, hd]
        self.trace_step: dict = {}
        model.forward(np.array([token]), [Segment(cache, n, 1)], self.trace_step)
        self.k_step, self.v_step = cache.k[0, :, : n + 1].copy(), cache.v[0, :, : n + 1].copy()  # [Hkv, n+1, hd]
        self.cache_token = token

    def _greedy(self):  # checkpoint 12: the whole generation loop, greedy
        *_, end = self.engine.generate(
            Request(prompt_ids=self.ids, max_tokens=self.n_tokens, sampling=SamplingParams(temperature=0.0), seed=0)
        )
        self.greedy = end.token_ids


class Capture(dict):
    """A reference's capture(); a name it does not hold raises NotAvailable (the checkpoint is "n/a")."""

    def __init__(self, data: dict, ref):
        super().__init__(data)
        self.ref = ref

    def __missing__(self, key):
        why = getattr(self.ref, "unavailable_reason", "")
        raise NotAvailable(f"{self.ref.name} does not expose {key!r}" + (f" ({why})" if why else ""))




def combine(parts: list[Result]) -> Result:
    """One checkpoint's result from its parts (one per path and run): passed only if every part passed; the
    largest difference; the first part's shape and statistics; the failing parts named in the note."""
    head = parts[0]
    if len(parts) == 1:
        head.paths = [_part(head)]
        return head
    # a failure anywhere fails the row; otherwise a row whose reference has nothing to compare stays n/a (its
    # reference-free parts, e.g. our own cache's bit-identity, are in paths[] and the note)
    status = next((st for st in ("error", "fail", "tie") if any(p.status == st for p in parts)),
                  "n/a" if head.status == "n/a" else "pass")
    diffs = [p.max_abs_diff for p in parts if p.max_abs_diff is not None] if status != "n/a" else []
    bad = [f"{p.path}: {p.note}" for p in parts[1:] if not p.passed]
    summary = f"{len(parts) - 1} more paths and runs: " + "; ".join(
        f"{p.path} {'-' if p.max_abs_diff is None else format(p.max_abs_diff, '.3g')}" for p in parts[1:])
    note = "; ".join(x for x in [head.note] + (bad or [summary]) if x)
    return Result(head.id, head.name, head.reference, head.shape, max(diffs) if diffs else None, head.tolerance,
                  all(p.passed for p in parts), status, head.stats, note, head.path, [_part(p) for p in parts])


def _part(r: Result) -> dict:
    d = max_abs_diff_json(r.max_abs_diff)
    return {"path": r.path, "shape": r.shape, "max_abs_diff": d, "tolerance": r.tolerance, "status": r.status,
            "note": r.note}


def max_abs_diff_json(d):
    return str(d) if d is not None and not math.isfinite(d) else d


@dataclass
class DecodeSide:
    """The decode-position comparison for one reference: our runs on every path (validate/decode.py), fed
    `forced`, and the reference's full forward over prompt + forced (`full`: its capture())."""

    prompt_ids: list[int]
    forced: list[int]
    runs: list  # [decode.PathRuns]
    full: dict


def run_checkpoints(engine: Engine, ours: OurSide, ref, family: str, decode: DecodeSide | None = None,
                    theirs_greedy: list[int] | None = None) -> list[Result]:
    """All twelve checkpoints of our side against one loaded reference; `decode`: the same at decode positions
    on every path; `theirs_greedy`: the reference's greedy tokens when already asked for."""
    results: list[Result] = []
    name = ref.name
    numerics = engine.model.numerics
    own = NUMERICS_TOLERANCES.get(numerics, {})
    theirs = dict(getattr(ref, "tolerances", None) or {})
    declared, reason = {}, {}  # per checkpoint: the larger of our mode's and the reference's declared tolerance
    for c in set(own) | set(theirs):
        if theirs.get(c, -1.0) >= own.get(c, -1.0):
            declared[c], reason[c] = theirs[c], getattr(ref, "tolerance_reason", "") or name + " reference tolerance"
        else:
            declared[c], reason[c] = own[c], NUMERICS_REASON[numerics]
    spec8 = CHECKPOINTS[8][1]
    tol8 = declared.get(8, spec8)  # checkpoint 8, the vs-reference part of 9, the tie rules of 10 and 12
    tol8_note = f"{reason[8]}, SPEC {tol_text(spec8)}" if 8 in declared else ""

    in_situ = dict(NUMERICS_DECODE_TOLERANCES.get(numerics, {}))
    # at decode rows the block output carries the errors of both its branches, computed from our own inputs
    in_situ[7] = max(in_situ.get(7, 0.0), declared.get(5, CHECKPOINTS[5][1]) + declared.get(6, CHECKPOINTS[6][1]))

    def attempt(cid, title, tol, path, fn) -> Result:
        try:
            res = fn(cid, title, tol)
        except NotAvailable as e:  # the reference cannot expose it: shown as N/A, not a failure
            res = Result(cid, title, name, [], None, tol, True, "n/a", {}, f"n/a: not compared: {e}")
        except Exception as e:  # a stage that crashes fails its checkpoint, with the reason
            tb = traceback.extract_tb(e.__traceback__)[-1]
            note = f"{type(e).__name__}: {e} (at {tb.filename.rsplit('/', 1)[-1]}:{tb.lineno})"
            res = Result(cid, title, name, [], None, tol, False, "error", {}, note)
        res.path = path
        return res

    def record(cid, fn, path):
        title, tol = CHECKPOINTS[cid]
        title = title.format(norm=NORM_NAME.get(family, "norm"))
        spec = tol
        if cid in declared:
            tol = declared[cid]
        res = attempt(cid, title, tol, path, fn)
        if cid in declared and cid != 8 and res.status not in ("n/a", "error"):  # 8's note says it already
            res.note = "; ".join(x for x in (res.note, f"{reason[cid]}, SPEC {tol_text(spec)}") if x)
        parts = [res]
        if decode is not None and cid in DECODE_PARTS:
            tol_d = max(tol, in_situ.get(cid, 0.0))
            for runs in decode.runs:
                for label, part in DECODE_PARTS[cid](runs):
                    parts.append(attempt(cid, title, tol_d, f"{runs.name}: {label}", part))
        results.append(combine(parts))

    def compare(cid, title, tol, pairs, note=""):
        """pairs: [(label, ours, ref)]; the checkpoint's diff is the largest of them."""
        diffs = {label: max_abs_diff(o, r) for label, o, r in pairs}
        worst = max(diffs.values())
        passed = worst <= tol
        _, o0, r0 = pairs[0]
        detail = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()) if len(pairs) > 1 else ""
        note = "; ".join(x for x in (detail, note) if x)
        return Result(cid, title, name, list(np.shape(o0)), worst, tol, passed, "pass" if passed else "fail",
                      {"ours": stats(o0), "reference": stats(r0)}, note)

    # the FFN's input norm (ln_2) is the residual after attention, normalised: held at decode rows to the attention
    # output's tolerance there, both in checkpoint 7 and as the test of whether checkpoint 6 can compare the FFN
    tol_ln2 = max(declared.get(5, CHECKPOINTS[5][1]), in_situ.get(5, 0.0))
    DECODE_PARTS = decode_parts(decode, ref, compare, tol8, tol8_note, tol_ln2) if decode is not None else {}
    cap = Capture(ref.capture(ours.ids), ref)
    st = engine.model.stages(0)

    isolated = "stage function fed the reference's inputs (prefill rows)"
    record(1, lambda c, t, tol: compare(c, t, tol, [("norm", st.norm_1(cap["block_in"]), cap["ln_1"])]), isolated)

    def cp2(c, t, tol):
        q, k, v = st.qkv(cap["ln_1"], 0)
        return compare(c, t, tol, [("q", q, cap["q"]), ("k", k, cap["k"]), ("v", v, cap["v"])])

    record(2, cp2, isolated)

    def cp3(c, t, tol):
        ours.need("cache")
        n = len(ours.ids)
        kept = ours.k_prompt.dtype  # float32, or float16 in the q8 numerics: the projections as the cache stores them
        own = [  # bit-identical: cache slots hold exactly the K/V our projection produced, at the right positions
            ("k prompt", ours.k_prompt, ours.trace_prompt["k"].transpose(1, 0, 2).astype(kept)),
            ("v prompt", ours.v_prompt, ours.trace_prompt["v"].transpose(1, 0, 2).astype(kept)),
            ("k kept", ours.k_step[:, :n], ours.k_prompt),
            ("v kept", ours.v_step[:, :n], ours.v_prompt),
            ("k new", ours.k_step[:, n:], ours.trace_step["k"].transpose(1, 0, 2).astype(kept)),
            ("v new", ours.v_step[:, n:], ours.trace_step["v"].transpose(1, 0, 2).astype(kept)),
        ]
        bad = [label for label, a, b in own if a.shape != b.shape or not np.array_equal(a, b)]
        try:
            snap = ref.cache(ours.ids, ours.cache_token)
        except NotAvailable as e:  # our own bit-identity is still checked: a broken cache fails here
            if bad:
                return Result(c, t, name, list(ours.k_step.shape), None, tol, False, "fail", {},
                              f"not bit-identical to our own K/V: {', '.join(bad)}; vs reference n/a: {e}")
            return Result(c, t, name, list(ours.k_step.shape), None, tol, True, "n/a", {},
                          f"n/a: not compared with the reference: {e}; our cache is bit-identical to our own "
                          f"projections at positions 0..n")
        r = compare(c, t, tol, [("k prompt", ours.k_prompt, snap.k_prompt), ("v prompt", ours.v_prompt, snap.v_prompt),
                                ("k step", ours.k_step, snap.k_step), ("v step", ours.v_step, snap.v_step)])
        if bad:
            r.passed, r.status = False, "fail"
            r.note = f"not bit-identical to our own K/V: {', '.join(bad)}; " + r.note
        else:
            r.note = "bit-identical to our own projections at positions 0..n; " + r.note
        return r

    record(3, cp3, f"prefill, then one decode step ({PATH_NAMES[engine.model.path]})")

    def cp4(c, t, tol):
        ours_s = st.scores(cap["q"], cap["k_all"], 0)  # [H, n, T]
        ref_s = cap["scores"]
        ref_masked = ref_s <= MASKED
        ours_masked = ~np.isfinite(ours_s) | (ours_s <= MASKED)
        if ours_s.shape == ref_s.shape and not np.array_equal(ref_masked, ours_masked):
            wrong = int((ref_masked != ours_masked).sum())
            return Result(c, t, name, list(ours_s.shape), math.inf, tol, False, "fail",
                          {"ours": stats(ours_s), "reference": stats(ref_s)}, f"causal mask differs at {wrong} positions")
        keep = ~ref_masked
        r = compare(c, t, tol, [("scores", np.where(keep, ours_s, 0.0), np.where(keep, ref_s, 0.0))],
                    note="masked positions agree; compared where unmasked")
        r.stats = {"ours": stats(np.where(keep, ours_s, np.nan)), "reference": stats(np.where(keep, ref_s, np.nan))}
        return r

    record(4, cp4, isolated)
    record(5, lambda c, t, tol: compare(c, t, tol, [("attn", st.attn_out(cap["scores"], cap["v_all"]), cap["attn_out"])]),
           isolated)
    record(6, lambda c, t, tol: compare(c, t, tol, [("ffn", st.ffn(cap["ln_2"]), cap["ffn_out"])]), isolated)
    record(7, lambda c, t, tol: compare(c, t, tol, [("block", st.block(cap["block_in"]), cap["block_out"])]), isolated)
    def cp8(c, t, tol):
        ours.need("logits")
        return compare(c, t, tol, [("logits", ours.full_logits, cap["logits"])], note=tol8_note)

    record(8, cp8, "prefill rows, traced forward")

    def cp9(c, t, tol):
        ours.need("logits")
        ours.need("selected")
        r = compare(c, t, tol, [("selected vs our full[-1]", ours.selected, ours.full_logits[-1])])
        d_ref = max_abs_diff(ours.selected, cap["logits"][-1])
        vs = f"vs reference last row {d_ref:.3g} (checkpoint 8 tolerance {tol8:g}{'; ' + tol8_note if tol8_note else ''})"
        r.note = "; ".join(x for x in (r.note, vs) if x)
        if d_ref > tol8:
            r.passed, r.status = False, "fail"
        return r

    record(9, cp9, "the prefill step's logits, as the sampler saw them")

    def cp10(c, t, tol):
        ours.need("selected")
        ref_logits = cap["logits"][-1]
        theirs = ref.argmax(ref_logits)
        ours_tok = ours.token
        top2 = np.sort(ref_logits)[-2:]
        gap = float(top2[1] - top2[0])
        s = {"ours": {"token": ours_tok}, "reference": {"token": theirs, "top2_gap": gap}}
        # our greedy step in isolation: the reference's argmax of the very logits our sampler saw must be our
        # token, exactly (no tolerance: it does not depend on how the logits were computed)
        # (both picks: the sampler's on the full logits, and the served step's, which a float32 head screens)
        own = int(ref.argmax(ours.selected))
        for who, tok in (("our sampler", ours.token_sampler), ("our served greedy step", ours_tok)):
            if own != tok:
                return Result(c, t, name, [1], math.inf, tol, False, "fail", s,
                              f"{who} picked {tok} from our own logits; the reference's argmax of those same "
                              f"logits is {own}")
        if ours_tok == theirs:
            return Result(c, t, name, [1], 0.0, tol, True, "pass", s, f"token {ours_tok}; top-2 gap {gap:.3g}")
        ours_gap = float(ref_logits[theirs] - ref_logits[ours_tok])  # how far below the reference's pick ours is
        why = f" ({tol8_note})" if tol8_note else ""
        if ours_gap < tol8:
            return Result(c, t, name, [1], ours_gap, tol, True, "tie", s,
                          f"tie: ours {ours_tok}, reference {theirs}, logit gap {ours_gap:.3g} below checkpoint 8 "
                          f"tolerance {tol8:g}{why}")
        return Result(c, t, name, [1], ours_gap, tol, False, "fail", s,
                      f"ours {ours_tok}, reference {theirs}: reference logit gap {ours_gap:.3g} >= checkpoint 8 "
                      f"tolerance {tol8:g}{why}")

    record(10, cp10, f"the prefill step's picks (sampler; served greedy step, {PATH_NAMES[engine.model.path]})")

    def cp11(c, t, tol):
        ref_logits = cap["logits"][-1]
        pairs, problems = [], []
        for temp in SOFTMAX_TEMPERATURES:
            p_ours = sampling.softmax_probs(ref_logits, temp)
            p_ref = ref.softmax(ref_logits, temp)
            pairs.append((f"T={temp}", p_ours, p_ref))
            if abs(float(p_ours.sum()) - 1.0) > 1e-6:
                problems.append(f"T={temp}: ours sums to {float(p_ours.sum()):.9f}")
            if not np.array_equal(np.argsort(-p_ours, kind="stable")[:10], np.argsort(-p_ref, kind="stable")[:10]):
                problems.append(f"T={temp}: top-10 order differs")
        r = compare(c, t, tol, pairs, note="; ".join(problems) or "sums to 1; same top-10 order")
        if problems:
            r.passed, r.status = False, "fail"
        return r

    record(11, cp11, "the sampler's softmax")

    def cp12(c, t, tol):
        ours.need("greedy")
        theirs = theirs_greedy if theirs_greedy is not None else ref.greedy(ours.ids, ours.n_tokens, engine.eos_token_id)
        mine = ours.greedy
        s = {"ours": {"tokens": mine}, "reference": {"tokens": theirs}}
        if mine == theirs:
            return Result(c, t, name, [len(mine)], 0.0, tol, True, "pass", s, f"{len(mine)} identical greedy tokens")
        j = next((i for i in range(min(len(mine), len(theirs))) if mine[i] != theirs[i]), min(len(mine), len(theirs)))
        if j >= min(len(mine), len(theirs)):
            return Result(c, t, name, [len(mine)], None, tol, False, "fail", s,
                          f"lengths differ: ours {len(mine)}, reference {len(theirs)} (EOS handling)")
        logits = engine.prefill_logits(ours.ids + mine[:j])[-1]
        gap = float(logits[mine[j]] - logits[theirs[j]])  # >= 0 when ours is our argmax
        tie = abs(gap) < tol8
        status = "tie" if tie else "fail"
        verdict = (f"{'tie: below' if tie else 'fail: not below'} checkpoint 8 tolerance {tol8:g}"
                   + (f" ({tol8_note})" if tol8_note else ""))
        return Result(c, t, name, [len(mine)], None, tol, tie, status, s,
                      f"paths part at step {j} ({j} identical tokens before it): ours {mine[j]}, reference "
                      f"{theirs[j]}, our logit gap {gap:.3g}; {verdict}")

    record(12, cp12, f"greedy generation ({PATH_NAMES[engine.model.path]})")
    return results



def decode_parts(decode: DecodeSide, ref, compare, tol8: float, tol8_note: str, tol_ln2: float) -> dict:
    """Checkpoint id -> fn(path runs) -> [(label, fn(cid, title, tol) -> Result)]: the comparisons at decode
    positions (validate/decode.py). Step j of a run fed position n + j; the reference's full forward has it at row
    n + j. `tol_ln2`: the FFN input norm's own tolerance (in checkpoint 7, and where checkpoint 6 compares)."""
    n, steps = len(decode.prompt_ids), len(decode.forced)
    full = Capture(decode.full, ref)
    ref_name = ref.name

    def ref_stage(stage: str, pos: int):
        if stage == "scores":
            return full["scores"][:, pos, : pos + 1]  # [H, T] of row pos (the causal mask leaves the rest)
        return full[stage][pos]

    def stages_part(stages: tuple, run):
        def fn(c, t, tol):
            worst: dict = {}  # stage -> (excess over its tolerance, diff, position, tolerance)
            upstream = []  # FFN (6): positions whose FFN input (ln_2) is already off - an earlier stage's doing (7)
            for j, mine in enumerate(run.stages):
                if c == 6 and not max_abs_diff(mine["ln_2"], ref_stage("ln_2", n + j)) <= tol_ln2:
                    upstream.append(n + j)
                    continue
                for stage in stages:
                    d, limit = max_abs_diff(mine[stage], ref_stage(stage, n + j)), tol_ln2 if stage == "ln_2" else tol
                    if stage not in worst or not d / limit <= worst[stage][0]:
                        worst[stage] = (d / limit, d, n + j, limit)
            if not worst:
                raise NotAvailable(f"the FFN's input (ln_2) differs from the reference's beyond {tol_ln2:g} at every "
                                   f"decode position: the residual before it is checked at checkpoint 7")
            excess, diff, _, limit = max(worst.values(), key=lambda w: (not w[0] <= 1.0, w[0]))
            ok = all(w[0] <= 1.0 for w in worst.values())
            last = run.stages[-1][stages[0]]
            note = ", ".join(f"{stage} {d:.3g} at position {pos}" + (f" (its tolerance {lim:g})" if lim != tol else "")
                             for stage, (_, d, pos, lim) in worst.items())
            if upstream:
                note += (f"; not compared at {len(upstream)} positions whose FFN input (ln_2) already differs beyond "
                         f"{tol_ln2:g} (checkpoint 7)")
            return Result(c, t, ref_name, [steps, *last.shape], diff, limit, ok,
                          "pass" if ok else "fail",
                          {"ours": stats(last), "reference": stats(ref_stage(stages[0], n + steps - 1))}, note)
        return fn

    def kv_part(run):
        def fn(c, t, tol):
            kept = run.k.dtype  # float32, or float16 in the q8 numerics
            bad = [n + j for j, mine in enumerate(run.stages)
                   if not (np.array_equal(run.k[:, n + j], mine["k"].astype(kept))
                           and np.array_equal(run.v[:, n + j], mine["v"].astype(kept)))]
            try:
                r = compare(c, t, tol, [("k", run.k, full["k_all"]), ("v", run.v, full["v_all"])],
                            note=f"every position 0..{n + steps - 1}")
            except NotAvailable as e:  # no reference cache: our own bit-identity check still holds
                if not bad:
                    raise NotAvailable(f"{e}; the cache the decode path wrote is bit-identical to the K/V its steps "
                                       f"computed") from None
                r = Result(c, t, ref_name, list(run.k.shape), None, tol, False, "fail", {}, "")
            if bad:
                r.passed, r.status = False, "fail"
                r.note = (f"the cache the decode path wrote is not bit-identical to the K/V its steps computed at "
                          f"positions {bad[:5]}{' ...' if len(bad) > 5 else ''}; " + r.note)
            return r
        return fn

    def identity_part(run, stage: str, expect, tolerance, why: str):
        """`stage` of run at every decode position against what its own other tensors define it to be: expect(j,
        stage tensors) in float64, within tolerance(stage tensors) - a relation the reference cannot blur."""
        def fn(c, t, _tol):
            worst, at, tol = 0.0, n, 0.0
            for j, mine in enumerate(run.stages):
                d = max_abs_diff(mine[stage], expect(j, mine))
                tol = max(tol, tolerance(mine))
                if not d <= worst:
                    worst, at = d, n + j
            ok = worst <= tol
            return Result(c, t, ref_name, [steps, *run.stages[-1][stage].shape], worst, tol, ok,
                          "pass" if ok else "fail", {}, f"largest at position {at} ({why})")
        return fn

    def residual_sum(j, mine):  # the block's two residual adds: block_in + attn_out + ffn_out
        return sum(mine[x].astype(np.float64) for x in ("block_in", "attn_out", "ffn_out"))

    def residual_rounding(mine):  # two float32 adds: within 2^-22 of the magnitudes summed
        return 2.0**-22 * sum(float(np.abs(mine[x]).max()) for x in ("block_in", "attn_out", "ffn_out"))

    def scores_definition(run):  # q·Kᵀ/sqrt(hd) of the step's own q and the K its cache holds, in float64
        def expect(j, mine):
            q = mine["q"].astype(np.float64)  # [H, hd]
            k = np.repeat(run.k[:, : n + j + 1].astype(np.float64), q.shape[0] // run.k.shape[0], axis=0)  # [H, T, hd]
            return np.einsum("hd,htd->ht", q, k) / math.sqrt(q.shape[-1])  # [H, T]
        return expect

    def logits_part(run):
        return lambda c, t, tol: compare(c, t, tol, [("logits", np.stack(run.logits), full["logits"][n : n + steps])],
                                         note=tol8_note)

    def same_part(run, alone, path):
        def fn(c, t, tol):
            if path == "numpy" and run.label.endswith(BATCHED):
                raise NotAvailable("numpy's BLAS sums in an order that depends on the number of rows: the numpy path "
                                   "does not promise batch-invariant bits (checkpoint 8 holds its batch rows)")
            a, b = np.stack(alone.logits), np.stack(run.logits)
            same = a.shape == b.shape and np.array_equal(a, b)
            cache = np.array_equal(alone.k, run.k) and np.array_equal(alone.v, run.v)
            d = max_abs_diff(b, a) if a.shape == b.shape else math.inf
            note = (f"logits {'bit-identical' if same else 'differ'} to the untraced single-sequence run over "
                    f"{steps} steps; block-0 cache {'bit-identical' if cache else 'differs'}")
            ok = same and cache
            return Result(c, t, ref_name, list(b.shape), d, tol, ok, "pass" if ok else "fail", {}, note)
        return fn

    def picks_part(run, alone):
        def fn(c, t, tol):
            mine = [int(np.argmax(l)) for l in alone.logits]
            wrong = [j for j in range(steps) if run.picks[j] != mine[j]]
            if wrong:
                j = wrong[0]
                return Result(c, t, ref_name, [steps], math.inf, tol, False, "fail", {},
                              f"at position {n + j} the step picked {run.picks[j]}; the argmax of the logits it served "
                              f"is {mine[j]} ({len(wrong)} of {steps} steps)")
            ties, fails = [], []
            for j in range(steps):
                row = full["logits"][n + j]
                theirs = int(ref.argmax(row))
                if theirs != mine[j]:
                    gap = float(row[theirs] - row[mine[j]])
                    (ties if gap < tol8 else fails).append((n + j, mine[j], theirs, gap))
            status = "fail" if fails else "tie" if ties else "pass"
            note = f"{steps} picks equal the argmax of the served logits"
            if ties or fails:
                pos, a, b, gap = (fails or ties)[0]
                note += (f"; {len(fails)} picks differ from the reference's argmax beyond checkpoint 8 tolerance "
                         f"{tol8:g}, {len(ties)} within it (first at position {pos}: ours {a}, reference {b}, reference "
                         f"logit gap {gap:.3g})")
            return Result(c, t, ref_name, [steps], 0.0, tol, not fails, status, {}, note)
        return fn

    parts = {cid: (lambda runs, names=names: [(runs.traced.label, stages_part(names, runs.traced)),
                                               (runs.batch.label, stages_part(names, runs.batch))])
             for cid, names in DECODE_STAGES.items()}
    stage_7, stage_4 = parts[7], parts[4]
    parts[7] = lambda runs: stage_7(runs) + [(runs.traced.label + ", block_in + attn_out + ffn_out", identity_part(
        runs.traced, "block_out", residual_sum, residual_rounding, "float32 rounding of two adds"))]
    parts[4] = lambda runs: stage_4(runs) + [(runs.traced.label + ", against q·Kᵀ/sqrt(hd) of its own q and cache",
                                              identity_part(runs.traced, "scores", scores_definition(runs.traced),
                                                            lambda _: CHECKPOINTS[4][1], "SPEC's tolerance, float64 definition"))]
    parts[3] = lambda runs: [(runs.traced.label, kv_part(runs.traced)), (runs.batch.label, kv_part(runs.batch))]
    parts[8] = lambda runs: [(runs.alone.label, logits_part(runs.alone)), (runs.batch.label, logits_part(runs.batch))]
    parts[9] = lambda runs: [(r.label, same_part(r, runs.alone, runs.path))
                             for r in (runs.traced, runs.batch, runs.one_thread) if r]
    parts[10] = lambda runs: [(runs.alone.label + " (sampler)", picks_part(runs.alone, runs.alone)),
                              (runs.served.label, picks_part(runs.served, runs.alone))]
    return parts
