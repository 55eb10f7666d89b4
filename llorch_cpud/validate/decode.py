"""What the code that serves tokens computes at decode positions (SPEC §2: every checkpoint on every path).

The prompt is prefilled, then the reference's own greedy tokens are fed one at a time through the engine's
production step (`Engine.step` with `Request.forced_tokens`), on each decode path the model can be built with
(models.base.PATHS: the fused C block, the per-stage C ops, the numpy stage functions of a build without the
extension). A `DecodeRun` is one such pass; per path the validator makes five:

    alone      untraced, one sequence: the logits every step served (checkpoint 8) and its block-0 cache (3)
    traced     the same with a trace: the block-0 stage tensors of every step (1-7), taken from the very
               code that ran (the fused block copies them out of its C call); logits bit-identical to alone (9)
    batch      traced, row 5 of a batch of 8 sequences at other lengths, two of which prefill beside it
               (a mixed step, as the scheduler makes): stage tensors (1-7), logits bit-identical to alone (9)
    one thread untraced with the kernels' OpenMP team at one thread: bit-identical to alone (9)
    served     untraced, greedy as a request is served (the head screen's pick where the model has one):
               each step's pick is the argmax of alone's logits, exactly (10)

Step j (1..K) feeds forced token j-1 at position n+j-1 (n prompt tokens), so it is compared with the reference's
full forward over prompt + forced tokens at row n+j-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llorch_cpud.engine import Engine, Request
from llorch_cpud.models.base import PATH_NAMES
from llorch_cpud.sampling import SamplingParams

STAGES = ("block_in", "ln_1", "q", "k", "v", "scores", "attn_out", "ln_2", "ffn_out", "block_out")
BATCH = 8  # sequences in the batched run
ROW = 5  # our sequence's index among them (rows of other sequences come before it)
JOIN = {6: 1, 7: 3}  # sequences that join (prefill) while ours decodes: index -> step
BATCHED = f"row {ROW} of a batch of {BATCH} (2 prefilling beside it)"


@dataclass
class DecodeRun:
    label: str
    logits: list = field(default_factory=list)  # [vocab] per decode step (None when the step kept none)
    picks: list = field(default_factory=list)  # the step's own pick at each decode step
    stages: list = field(default_factory=list)  # per decode step: block-0 tensors of our row (traced runs)
    k: np.ndarray | None = None  # block-0 cache after the run, [Hkv, n+K, hd]
    v: np.ndarray | None = None


def _greedy(prompt_ids: list[int], forced: list[int], keep_logits: bool, engine: Engine):
    seq = engine.start(Request(prompt_ids=prompt_ids, max_tokens=len(forced) + 1,
                               sampling=SamplingParams(temperature=0.0), seed=0, forced_tokens=forced))
    seq.keep_logits = keep_logits
    return seq


def _others(engine: Engine, prompt_ids: list[int], steps: int) -> list:
    """The batch's other sequences: prompts cut from a rotation of ours at lengths unlike ours, each forced along
    a cycle of the prompt's tokens (EOS left out) so that none ends before ours."""
    eos = engine.eos_token_id
    pool = [t for t in prompt_ids if t != eos] or [0 if eos != 0 else 1]
    room = engine.model.n_ctx - steps - 2
    out = []
    for i in range(BATCH - 1):
        length = max(1, min(room, [1, 3, len(prompt_ids) + 2, 5, 2 * len(prompt_ids), 4, 7][i]))
        ids = [pool[(i + j) % len(pool)] for j in range(length)]
        forced = [pool[(3 * i + j) % len(pool)] for j in range(steps + 1)]
        out.append(_greedy(ids, forced, False, engine))
    return out


def _row_stages(trace: dict, row: int, seg: int) -> dict:
    """Our row's block-0 tensors from a step's trace (scores: its segment's [H, T])."""
    out = {name: trace[name][row] for name in STAGES if name != "scores" and name in trace}
    if "scores" in trace:
        out["scores"] = trace["scores"][seg][:, -1, :]  # [H, 1, T] -> [H, T]
    return out


def teacher_forced(engine: Engine, prompt_ids: list[int], forced: list[int], label: str, *, traced: bool = False,
                   batch: bool = False, keep_logits: bool = True) -> DecodeRun:
    """Prefill `prompt_ids`, then feed `forced` one token a step through `engine.step` (see the module doc)."""
    seq = _greedy(prompt_ids, forced, keep_logits, engine)
    cache = seq.cache  # the sequence lets go of it when it ends
    others = _others(engine, prompt_ids, len(forced)) if batch else []
    run = DecodeRun(label)
    for step in range(len(forced) + 1):
        if batch:  # others[i] is the batch's sequence i (i < ROW) or i + 1
            joined = [s for i, s in enumerate(others) if step >= JOIN.get(i if i < ROW else i + 1, 0)]
            order = joined[:ROW] + [seq] + joined[ROW:]
        else:
            order = [seq]
        live = [s for s in order if not s.done]
        mine = live.index(seq)
        row = sum(len(s.pending) for s in live[:mine])
        trace = {} if traced else None
        engine.step(live, trace)
        if seq.error is not None:
            raise RuntimeError(f"our decode step failed at step {step}: {seq.error.message}")
        if step == 0:
            continue  # the prefill: checkpoints 1-9 cover it
        run.logits.append(seq.last_logits)
        run.picks.append(seq.picks[-1])
        if traced:
            run.stages.append(_row_stages(trace, row, mine))
    for s in others:
        s.cancel_now()
    n = len(prompt_ids) + len(forced)
    run.k, run.v = cache.k[0, :, :n].copy(), cache.v[0, :, :n].copy()
    return run


@dataclass
class PathRuns:
    """The five runs of one decode path (module doc), for one list of forced tokens."""

    path: str
    alone: DecodeRun
    traced: DecodeRun
    batch: DecodeRun
    served: DecodeRun
    one_thread: DecodeRun | None  # None on the numpy path (no OpenMP team)

    @property
    def name(self) -> str:
        return PATH_NAMES[self.path]


def run_path(engine: Engine, prompt_ids: list[int], forced: list[int]) -> PathRuns:
    path = engine.model.path
    n, k = len(prompt_ids), len(forced)
    where = f"decode rows {n}..{n + k - 1}"
    alone = teacher_forced(engine, prompt_ids, forced, f"{where}, alone")
    traced = teacher_forced(engine, prompt_ids, forced, f"{where}, alone, traced", traced=True)
    batch = teacher_forced(engine, prompt_ids, forced, f"{where}, {BATCHED}", traced=True, batch=True)
    served = teacher_forced(engine, prompt_ids, forced, f"{where}, served greedy picks", keep_logits=False)
    one_thread = None
    if path != "numpy":
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="openmp"):
            one_thread = teacher_forced(engine, prompt_ids, forced, f"{where}, alone, 1 thread")
    return PathRuns(path, alone, traced, batch, served, one_thread)


def forced_tokens(theirs: list[int], prompt_ids: list[int], steps: int, eos: int | None) -> list[int]:
    """The tokens to feed: the reference's greedy continuation up to its EOS (which would end our sequence), made
    up to `steps` with the prompt's own tokens (EOS left out)."""
    out = list(theirs[: theirs.index(eos) if eos in theirs else steps])[:steps]
    pool = [t for t in prompt_ids if t != eos] or [0 if eos != 0 else 1]
    while len(out) < steps:
        out.append(pool[len(out) % len(pool)])
    return out
