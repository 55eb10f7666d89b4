"""One request's failure never touches another's (SPEC §4): a sampler that raises, or logits holding a NaN, end
that sequence alone with INFERENCE_FAILED; the other sequences of the same steps produce bit-identical tokens
and logits to a run without the failing one."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import llorch_cpud.engine as engine_mod
from llorch_cpud.engine import EndEvent, ErrorEvent, Request
from llorch_cpud.sampling import SamplingParams
from llorch_cpud.server.metrics import Metrics
from llorch_cpud.server.scheduler import Job, Scheduler

GOOD = [("Hello.", SamplingParams(temperature=0.0)), ("Once upon a time", SamplingParams(temperature=0.9, top_p=0.9)),
        ("def f(x):", SamplingParams(temperature=0.7, repetition_penalty=1.3))]
BAD_MARK = 4321  # top_k value that marks the sequence whose sampling fails
N = 10


@pytest.fixture(scope="module")
def engine(gpt2_small):
    from llorch_cpud.engine import load_engine

    return load_engine(str(gpt2_small))[0]


@pytest.fixture
def failing_sampler(monkeypatch):
    """The engine's sampler raises for the marked sequence from its 3rd token on (after it shared steps)."""
    real = engine_mod.sample

    def sample(logits, params, rng, history=(), **kw):  # kw: the sampler's options (a grammar's allowed tokens)
        if params.top_k == BAD_MARK and len(history) > 3:
            raise ValueError("probabilities must have a positive finite sum, got nan")
        return real(logits, params, rng, history, **kw)

    monkeypatch.setattr(engine_mod, "sample", sample)


def requests(with_bad: bool) -> list[Request]:
    out = [Request(prompt=p, max_tokens=N, sampling=s, seed=11 + i) for i, (p, s) in enumerate(GOOD)]
    if with_bad:
        out.insert(1, Request(prompt="Dear Bob,", max_tokens=N, sampling=SamplingParams(temperature=0.8, top_k=BAD_MARK),
                              seed=5))
    return out


def run_steps(engine, reqs):
    """Step all sequences together until done; return (events per sequence, logits each step per sequence)."""
    seqs = [engine.start(r) for r in reqs]
    events = [[] for _ in seqs]
    logits = [[] for _ in seqs]
    for _ in range(N + 2):
        if all(s.done for s in seqs):
            break
        for i, evs in enumerate(engine.step(seqs)):
            events[i] += evs
            if evs or seqs[i].last_logits is not None and not seqs[i].done:
                logits[i].append(None if seqs[i].last_logits is None else seqs[i].last_logits.copy())
    return events, logits


def test_a_failing_sequence_ends_alone_and_the_others_are_bit_identical(engine, failing_sampler):
    ref_events, ref_logits = run_steps(engine, requests(with_bad=False))
    events, logits = run_steps(engine, requests(with_bad=True))
    bad_events = events.pop(1)
    logits.pop(1)
    assert isinstance(bad_events[-1], ErrorEvent) and bad_events[-1].code == "INFERENCE_FAILED"
    assert "positive finite sum" in bad_events[-1].message
    assert sum(isinstance(e, ErrorEvent) for e in bad_events) == 1
    for ref, got, ref_l, got_l in zip(ref_events, events, ref_logits, logits):
        assert isinstance(got[-1], EndEvent) and got[-1].token_ids == ref[-1].token_ids and len(got[-1].token_ids) == N
        assert [e.text for e in got] == [e.text for e in ref]
        assert len(got_l) == len(ref_l) and all(
            (a is None and b is None) or np.array_equal(a, b) for a, b in zip(ref_l, got_l))


def test_nan_logits_end_that_sequence_alone(engine, monkeypatch):
    """A NaN in one sequence's logits row (as a broken model would give) fails that sequence, not the step."""
    real_logits = engine.model.logits
    target = {}

    def logits(rows):
        out = real_logits(rows)
        if out.shape[0] == len(GOOD) + 1:  # the rows of all four sequences: poison the marked one's
            out[target["row"]] = np.nan
        return out

    reqs = requests(with_bad=True)
    for r in reqs:  # every sequence sampled (none on the model's greedy path): row i of the logits is sequence i
        r.sampling = SamplingParams(temperature=0.8)
    target["row"] = 1
    monkeypatch.setattr(engine.model, "logits", logits)
    seqs = [engine.start(r) for r in reqs]
    results = engine.step(seqs)
    failed = [i for i, s in enumerate(seqs) if s.error is not None]
    assert failed == [1] and results[1][-1].code == "INFERENCE_FAILED" and "non-finite" in results[1][-1].message
    assert all(not s.done and len(s.generated) == 1 for i, s in enumerate(seqs) if i != 1)
    assert engine.step(seqs)[1] == []  # a failed sequence takes no further part


def test_scheduler_delivers_the_error_to_its_job_only(engine, failing_sampler):
    async def main(reqs):
        sch = Scheduler(engine, Metrics(), max_batch=8)
        sch.start()
        loop = asyncio.get_running_loop()
        jobs = [Job(job_id=f"j{i}", seq=engine.start(r), endpoint="execute", loop=loop) for i, r in enumerate(reqs)]
        for j in jobs:
            sch.submit(j)

        async def drain(job):
            out = []
            while not out or out[-1][0] not in ("end", "error"):
                out += await job.queue.get()
            return out

        results = await asyncio.gather(*(drain(j) for j in jobs))
        sch.stop()
        return results

    ref = asyncio.run(main(requests(with_bad=False)))
    got = asyncio.run(main(requests(with_bad=True)))
    bad = got.pop(1)
    assert bad[-1] == ("error", {"code": "INFERENCE_FAILED",
                                 "message": "sampling failed: ValueError: probabilities must have a positive finite sum, got nan"})
    for r, g in zip(ref, got):
        assert g[-1][0] == "end" and g[-1][1].token_ids == r[-1][1].token_ids
