"""The engine thread on its own (no HTTP): queueing past max_batch, batched decode, cancellation, shutdown."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from llorch_cpud.engine import EndEvent, Request, TokenEvent
from llorch_cpud.sampling import SamplingParams
from llorch_cpud.server.metrics import Metrics
from llorch_cpud.server.scheduler import Job, NotAccepting, PrefillBudget, Scheduler

PROMPTS = ["Hello.", "Once upon a time", "def f(x):", "The capital of France is", "1 2 3", "Dear Bob,"]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine(gpt2_small):
    from llorch_cpud.engine import load_engine

    return load_engine(str(gpt2_small))[0]


def reference(engine, prompt, n):
    return [e for e in engine.generate(Request(prompt=prompt, max_tokens=n, sampling=GREEDY)) if isinstance(e, EndEvent)][0]


async def drain(job: Job) -> list:
    out = []
    while True:
        for kind, ev in await job.queue.get():
            out.append((kind, ev))
            if kind in ("end", "error"):
                return out


def run(coro):
    return asyncio.run(coro)


def test_more_jobs_than_batch_slots_all_exact(engine):
    async def main():
        metrics = Metrics()
        sch = Scheduler(engine, metrics, max_batch=2)
        sch.start()
        loop = asyncio.get_running_loop()
        jobs = [Job(job_id=f"j{i}", seq=engine.start(Request(prompt=p, max_tokens=12, sampling=GREEDY)),
                    endpoint="execute", loop=loop) for i, p in enumerate(PROMPTS)]
        for j in jobs:
            sch.submit(j)
        results = await asyncio.gather(*(drain(j) for j in jobs))
        sch.stop()
        return metrics, results

    metrics, results = run(main())
    for p, evs in zip(PROMPTS, results):
        ref = reference(engine, p, 12)
        assert "".join(ev.text for k, ev in evs if k == "token") == ref.text
        assert evs[-1][0] == "end" and evs[-1][1].token_ids == ref.token_ids
        assert [ev.index for k, ev in evs if k == "token"] == list(range(sum(k == "token" for k, _ in evs)))
    assert metrics.decode["rows_max"] == 2  # never more than max_batch rows, and batched when possible
    assert metrics.tokens_generated == 12 * len(PROMPTS)


def test_cancel_queued_and_running_and_shutdown(engine):
    async def main():
        sch = Scheduler(engine, Metrics(), max_batch=1)
        sch.start()
        loop = asyncio.get_running_loop()
        mk = lambda i: Job(job_id=f"k{i}", seq=engine.start(Request(prompt="Hello.", max_tokens=1000, sampling=GREEDY)),  # noqa: E731
                           endpoint="execute", loop=loop)
        running, queued, last = mk(0), mk(1), mk(2)
        for j in (running, queued, last):
            sch.submit(j)
        first = await running.queue.get()  # running has produced something
        assert first[0][0] == "token"
        queued.cancel("cancel")
        sch.wake()
        q = await drain(queued)
        running.cancel("cancel")
        sch.wake()
        r = await drain(running)
        sch.cancel_all("shutdown")
        s = await drain(last)
        with pytest.raises(NotAccepting):
            sch.submit(mk(3))
        sch.stop()
        assert not sch.thread.is_alive()
        return q, r, s, running, queued, last

    q, r, s, running, queued, last = run(main())
    assert q == [("end", queued.seq.end)] and queued.seq.end.stop_reason == "cancelled" and queued.seq.end.tokens_out == 0
    assert r[-1][0] == "end" and r[-1][1].stop_reason == "cancelled" and 0 < r[-1][1].tokens_out < 1000
    assert s[-1][0] == "end" and s[-1][1].stop_reason == "cancelled"
    for j in (running, queued, last):
        assert j.seq.cache is None  # KV cache freed
    assert running.outcome == "cancelled" and last.outcome == "shutdown"


def test_inference_failure_is_an_error_event_and_the_loop_survives(engine, monkeypatch):
    async def main():
        sch = Scheduler(engine, Metrics(), max_batch=4)
        sch.start()
        loop = asyncio.get_running_loop()
        real = engine.step
        calls = {"n": 0}

        def flaky(seqs, trace=None):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return real(seqs, trace)

        monkeypatch.setattr(engine, "step", flaky)
        bad = Job(job_id="bad", seq=engine.start(Request(prompt="Hi", max_tokens=3, sampling=GREEDY)), endpoint="execute", loop=loop)
        sch.submit(bad)
        b = await drain(bad)
        good = Job(job_id="good", seq=engine.start(Request(prompt="Hi", max_tokens=3, sampling=GREEDY)), endpoint="execute", loop=loop)
        sch.submit(good)
        g = await drain(good)
        sch.stop()
        return b, g

    b, g = run(main())
    assert b == [("error", {"code": "INFERENCE_FAILED", "message": "RuntimeError: boom"})]
    assert g[-1][0] == "end" and g[-1][1].tokens_out == 3
    assert all(isinstance(ev, TokenEvent) for k, ev in g[:-1])


def test_prompts_in_one_step_are_bit_identical_to_each_alone(engine):
    """The scheduler prefills arrivals together; each one's logits must equal its single-sequence run:
    bit for bit with the C kernels (rows summed in a fixed order), to float32 rounding on numpy's BLAS."""
    import numpy as np

    from llorch_cpud import kernels

    def same(a, b):
        return np.array_equal(a, b) if kernels.enabled() else np.allclose(a, b, rtol=0, atol=1e-4)

    reqs = [Request(prompt=p, max_tokens=4, sampling=GREEDY) for p in PROMPTS[:4]]
    together = [engine.start(r) for r in reqs]
    engine.step(together)
    for r, s in zip(reqs, together):
        alone = engine.start(r)
        engine.step([alone])
        assert same(alone.last_logits, s.last_logits)
        assert alone.generated == s.generated
    engine.step(together)  # and the decode step after it, batched vs alone
    for r, s in zip(reqs, together):
        alone = engine.start(r)
        engine.step([alone])
        engine.step([alone])
        assert same(alone.last_logits, s.last_logits)


@pytest.mark.parametrize("prefill_tokens", [4096, 1])
def test_arrivals_prefilled_together_up_to_the_token_budget(engine, prefill_tokens):
    """A budget above the prompts prefills them all in one step; a budget of one token prefills one token a step
    (chunks), beside the decode rows of the prompts already done - the same tokens either way."""
    n_tokens = sum(len(engine.tokenizer.encode(p)) for p in PROMPTS)
    steps = 1 if prefill_tokens >= n_tokens else -(-n_tokens // prefill_tokens)

    async def main():
        metrics = Metrics()
        sch = Scheduler(engine, metrics, max_batch=8, prefill_tokens=prefill_tokens)
        loop = asyncio.get_running_loop()
        jobs = [Job(job_id=f"p{i}", seq=engine.start(Request(prompt=p, max_tokens=6, sampling=GREEDY)),
                    endpoint="execute", loop=loop) for i, p in enumerate(PROMPTS)]
        for j in jobs:  # all waiting before the engine thread's first look
            sch.submit(j)
        sch.start()
        results = await asyncio.gather(*(drain(j) for j in jobs))
        sch.stop()
        return metrics, results

    metrics, results = run(main())
    assert metrics.prefill["steps"] == steps
    assert metrics.prefill["tokens"] == sum(len(engine.tokenizer.encode(p)) for p in PROMPTS)
    for p, evs in zip(PROMPTS, results):
        ref = reference(engine, p, 6)
        assert evs[-1][0] == "end" and evs[-1][1].token_ids == ref.token_ids
    # together, all six decode in every step; a token a step, the first finishes its 6 tokens
    # before the last is prefilled
    assert (metrics.decode["rows_max"] == len(PROMPTS)) == (steps == 1)


def test_a_prompt_prefilled_in_chunks_gives_the_same_token(engine):
    """Sequence.chunk: the prompt goes in a few tokens a step (nothing sampled until its last chunk), and the
    first token's logits are those of the one-pass prefill: bit for bit on the C paths (each row of a prompt is a
    row of its own in the C attention, whatever the chunks), to float32 rounding on the numpy path (a chunk's
    attention sums over the cache in another order); the greedy tokens the same."""
    req = Request(prompt=" ".join(PROMPTS), max_tokens=4, sampling=GREEDY)
    whole = engine.start(req)
    whole.keep_logits = True
    engine.step([whole])
    chunked = engine.start(req)
    chunked.keep_logits, chunked.chunk = True, 3
    n, steps = len(chunked.prompt_ids), 0
    while not chunked.generated:
        assert engine.step([chunked]) == [[]] or chunked.generated  # no event before the prompt's last chunk
        steps += 1
    assert steps == -(-n // 3) and chunked.pos == n
    assert np.abs(chunked.last_logits - whole.last_logits).max() < 1e-4
    if engine.model.path != "numpy":
        assert np.array_equal(chunked.last_logits, whole.last_logits)
    chunked.chunk = None
    while not (chunked.done and whole.done):
        engine.step([s for s in (chunked, whole) if not s.done])
    assert chunked.generated == whole.generated


# ---------------------------------------------------------------- the prompt chunk beside decoding streams


def simulate(budget, decode_s: float, token_s, n_prompt: int, noise: float = 0.1, seed: int = 0):
    """A long prompt prefilled beside one decoding stream on a model of the step's cost: decode_s for the decode
    row, token_s(p) for the prompt token at position p, each step's time off by up to +-noise. Returns the step
    times while the prompt went in (the stream's gaps) and the chunk sizes."""
    rng = np.random.default_rng(seed)
    jitter = lambda: 1 + noise * rng.uniform(-1, 1)  # noqa: E731
    for _ in range(5):  # the stream alone first
        budget.record(decode_s * jitter(), True, 0)
    pos, gaps, chunks = 0, [], []
    while pos < n_prompt:
        n = min(budget.tokens(True), n_prompt - pos)
        dt = (decode_s + sum(token_s(p) for p in range(pos, pos + n))) * jitter()
        budget.record(dt, True, n)
        gaps.append(dt)
        chunks.append(n)
        pos += n
    return np.array(gaps), chunks


def long_prompt_cost(p: int) -> float:  # SmolLM2-like: 3 ms of products + attention growing to 20 ms at 8k
    return 3e-3 + 20e-3 * p / 8000


def test_prompt_chunks_keep_a_decoding_stream_under_max_gap():
    """While an 8,000-token prompt is prefilled beside a stream, every step stays under 3x the stream's decode step
    (max_gap 2.5 plus the measurement noise), the chunks shrink as the prompt's positions get dearer, and alone
    the prompt goes in max_tokens at a time. Negative control: the fixed 64-token chunk the scheduler used before
    takes ~100x the decode step at the end of the prompt."""
    decode_s = 15e-3
    budget = PrefillBudget(max_tokens=512, max_gap=2.5)
    gaps, chunks = simulate(budget, decode_s, long_prompt_cost, 8000)
    assert gaps.max() < 3.0 * decode_s
    assert chunks[1] > chunks[-1] == 1  # a position near 8k costs more than a decode step's spare: one a step
    assert sum(chunks) == 8000 and len(chunks) < 0.8 * 8000
    assert budget.tokens(False) == 512

    fixed = PrefillBudget(max_tokens=64, max_gap=1e9)  # the old scheduler: 64 tokens a step whatever they cost
    gaps_fixed, _ = simulate(fixed, decode_s, long_prompt_cost, 8000)
    assert gaps_fixed.max() > 50 * decode_s


def test_prompt_chunk_before_any_measurement_is_small_and_never_zero():
    b = PrefillBudget(max_tokens=512, max_gap=2.5, first_chunk=8)
    assert b.tokens(True) == 8  # nothing measured yet
    b.record(0.010, True, 0)
    assert b.tokens(True) == 8  # the decode step known, a prompt token's cost not yet
    b.record(1.0, True, 8)  # a prompt token far dearer than the spare time: still one token a step
    assert b.tokens(True) == 1
    b2 = PrefillBudget(max_tokens=4, max_gap=2.5)
    b2.record(0.010, True, 0)
    b2.record(0.0101, True, 8)  # nearly free tokens: capped at max_tokens
    assert b2.tokens(True) == 4


def test_a_few_slow_decode_steps_do_not_move_the_bound():
    """The steps slowed as a long request arrives (its tokenising holds the GIL) must not raise the decode step the
    chunk is sized against: the median of the recent ones. Negative control: their mean would move 40%."""
    b = PrefillBudget(max_tokens=512, max_gap=2.0)
    steps = [0.010] * 20 + [0.050] * 3
    for dt in steps:
        b.record(dt, True, 0)
    assert b.decode_s == 0.010
    assert np.mean(steps) > 1.4 * 0.010
