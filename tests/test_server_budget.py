"""The memory budget (issue 15): the running requests' KV caches and one step's activations within
`serve --memory-budget-mb`.

In process (no HTTP):
- a request's bytes are exactly its KV cache's `KVCache.nbytes` (float32 caches, and the q8 numerics' float16);
- one step's activations (tracemalloc's peak, at a prompt chunk attending over nearly the whole context beside
  a full batch of sampled decode rows) stay under the reserve set aside for them;
- the scheduler: jobs that fit alone but not together all complete with the tokens they have alone, some of
  them waiting, the caches held together never over the budget; the negative control (no budget) goes over it
  with the same jobs; a job waiting for memory counts as queued (QueueFull past max_queue); a job over the
  budget alone is refused at submit.
Real `serve` processes on loopback, on the `deep` fixture (24 layers of 128: 24 KiB of KV cache a position,
cheap steps):
- a request over the budget alone gets 400 naming `max_tokens` (or `prompt`) and the limit, on /execute and
  /v1/completions; chat's default max_tokens stays within the budget; a stream running meanwhile is unharmed;
- eight requests that fit two at a time all complete, six of them waiting (one more gets 503 with Retry-After
  from `--max-queue 6`); the caches held together (/health kv_cache_peak_bytes, from the caches' nbytes) and
  the growth of the server's peak RSS (VmHWM, reset before the burst) stay within the budget;
- negative control: the same eight against a server whose budget is bypassed (100000 MiB) take more than that
  budget, in caches and in RSS: the two assertions above fail there;
- a budget too small for one step fails start-up in one line.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest

from llorch_cpud.engine import EndEvent, Request
from llorch_cpud.sampling import SamplingParams
from llorch_cpud.server.budget import MIB, MemoryBudget, TooLarge, activation_bytes
from llorch_cpud.server.metrics import Metrics
from llorch_cpud.server.scheduler import Job, QueueFull, Scheduler
from test_server import CHAT_TEMPLATE, Worker, sse

GREEDY = SamplingParams(temperature=0.0)
FIGURES: dict = {}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def words(i: int, n: int) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))


@pytest.fixture(scope="module")
def engine(gpt2_small):
    from llorch_cpud.engine import load_engine

    return load_engine(str(gpt2_small))[0]


# ---------------------------------------------------------------------------- the accounting


class StubModel:
    """A model's shape and cache, nothing else (the fast tier: no torch, no weights)."""

    def __init__(self, n_layer=4, n_head=4, n_embd=64, n_ctx=512, vocab_size=1000):
        from types import SimpleNamespace

        self.config = SimpleNamespace(n_layer=n_layer, n_head=n_head, n_embd=n_embd, head_dim=n_embd // n_head,
                                      n_inner=None)
        self.n_ctx, self.vocab_size = n_ctx, vocab_size
        self.path = "numpy"  # how its blocks would run (models.base.PATHS): the numpy path's attention scratch

    def new_cache(self, max_seq):
        from llorch_cpud.cache import KVCache

        c = self.config
        return KVCache.allocate(c.n_layer, c.n_head, min(max_seq, self.n_ctx), c.head_dim)


def test_budget_arithmetic_and_the_fields_it_blames():
    model = StubModel()
    per = 2 * 4 * 4 * 16 * 4  # k and v, 4 layers, 4 heads, 16 wide, float32
    reserve = activation_bytes(model, 4, 16)
    b = MemoryBudget.for_model(model, budget_mb=(reserve + 300 * per) / MIB, max_batch=4, prefill_tokens=16)
    assert b.position_bytes == per and b.activations == reserve and b.max_positions == 300
    assert b.cache_bytes(10) == model.new_cache(10).nbytes and b.cache_bytes(10**6) == model.new_cache(10**6).nbytes
    assert b.errors(100, 200, "p") == []  # exactly the limit fits
    (e,) = b.errors(100, 201, "p")
    assert e["field"] == "max_tokens" and e["value"] == 201 and "at most 200 max_tokens" in e["message"]
    assert "<= 300" in e["constraint"] and "--memory-budget-mb" in e["constraint"]
    (e,) = b.errors(300, 1, "p")
    assert e["field"] == "prompt" and "300 tokens" in e["message"] and "300 positions" in e["message"]
    big = MemoryBudget.for_model(model, budget_mb=1024, max_batch=4, prefill_tokens=16)
    assert big.max_positions == model.n_ctx  # the context, not the budget, bounds it then


@pytest.mark.slow
def test_a_requests_bytes_are_its_caches_nbytes(engine, smollm2_gguf):
    from llorch_cpud.engine import load_engine

    engines = [("gpt2 float32", engine), ("llama float32", load_engine(str(smollm2_gguf))[0]),
               ("llama q8", load_engine(str(smollm2_gguf), numerics="q8")[0])]
    for name, eng in engines:
        b = MemoryBudget.for_model(eng.model, budget_mb=4096, max_batch=16, prefill_tokens=64)
        for n in (1, 2, 17, 300, eng.model.n_ctx):
            assert b.cache_bytes(n) == eng.model.new_cache(n).nbytes, (name, n)
        seq = eng.start(Request(prompt="Hello there", max_tokens=40, sampling=GREEDY), defer_cache=True)
        assert seq.cache is None  # a waiting request holds no cache
        seq.allocate_cache()
        assert seq.cache.nbytes == b.cache_bytes(len(seq.prompt_ids) + 40), name
        FIGURES.setdefault("kv_bytes_per_position", {})[name] = b.position_bytes
    assert engines[2][1].model.new_cache(1).k.dtype.itemsize == 2  # q8 keeps float16: half the bytes
    assert FIGURES["kv_bytes_per_position"]["llama q8"] * 2 == FIGURES["kv_bytes_per_position"]["llama float32"]


def measured_step_activations(eng, max_batch: int, chunk: int, context: int) -> int:
    """tracemalloc's peak over one step: max_batch - 1 sampled decode rows and a prompt's last chunk of `chunk`
    tokens at position context - chunk (the prompt prefilled before, in chunks)."""
    seqs = []
    for i in range(max_batch - 1):
        s = eng.start(Request(prompt_ids=[2 + i, 3, 4], max_tokens=4, sampling=SamplingParams(temperature=0.8, top_p=0.9),
                              seed=i))
        eng.step([s])
        seqs.append(s)
    big = eng.start(Request(prompt_ids=[1 + (i * 7) % 1000 for i in range(context - 1)], max_tokens=1,
                            sampling=SamplingParams(temperature=0.8), seed=0))
    while len(big.pending) > chunk:
        big.chunk = min(256, len(big.pending) - chunk)
        eng.step([big])
    big.chunk = chunk
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        eng.step(seqs + [big])
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_one_steps_activations_stay_under_the_reserve(engine):
    max_batch, chunk = 16, 64
    reserve = activation_bytes(engine.model, max_batch, chunk)
    peak = measured_step_activations(engine, max_batch, chunk, engine.model.n_ctx)
    FIGURES["activations_gpt2_small"] = {"reserve_mib": round(reserve / MIB, 2), "peak_mib": round(peak / MIB, 2)}
    assert 0 < peak <= reserve


# ---------------------------------------------------------------------------- the scheduler


PROMPTS = ["Hello.", "Once upon a time", "def f(x):", "The capital of France is", "1 2 3", "Dear Bob,"]
N_NEW = 40


def budget_for(engine, n_jobs_together: float) -> MemoryBudget:
    """Room for the caches of `n_jobs_together` jobs of the longest prompt (activations set aside: 1 MiB)."""
    per = engine.model.new_cache(1).nbytes
    longest = max(len(engine.tokenizer.encode(p)) for p in PROMPTS) + N_NEW
    return MemoryBudget(total=MIB + int(n_jobs_together * longest * per), position_bytes=per, activations=MIB,
                        n_ctx=engine.model.n_ctx, source="test")


def run_jobs(engine, budget, max_queue=256):
    """Submit every prompt (before the engine thread starts), run them all; (scheduler, queued at submit, events)."""

    async def main():
        sch = Scheduler(engine, Metrics(), max_batch=16, max_queue=max_queue, budget=budget)
        loop = asyncio.get_running_loop()
        jobs = [Job(job_id=f"b{i}", seq=engine.start(Request(prompt=p, max_tokens=N_NEW, sampling=GREEDY),
                                                      defer_cache=True), endpoint="execute", loop=loop)
                for i, p in enumerate(PROMPTS)]
        for j in jobs:
            sch.submit(j)
        queued = sch.queued
        sch.start()
        out = []
        for j in jobs:
            evs = []
            while not evs or evs[-1][0] not in ("end", "error"):
                evs += await j.queue.get()
            out.append(evs)
        sch.stop()
        return sch, queued, out

    return asyncio.run(main())


def test_jobs_that_fit_alone_but_not_together_all_complete_within_the_budget(engine):
    budget = budget_for(engine, 2.5)  # two of them at a time
    sch, queued, results = run_jobs(engine, budget)
    assert queued == len(PROMPTS) - 2  # all beyond the two that fit wait, counted as queued
    for p, evs in zip(PROMPTS, results):
        ref = [e for e in engine.generate(Request(prompt=p, max_tokens=N_NEW, sampling=GREEDY)) if isinstance(e, EndEvent)][0]
        assert evs[-1][0] == "end" and evs[-1][1].token_ids == ref.token_ids
    total = sum(budget.cache_bytes(len(engine.tokenizer.encode(p)) + N_NEW) for p in PROMPTS)
    assert 0 < sch.cache_bytes_peak <= budget.cache_room < total
    assert sch.cache_bytes == 0 and not sch.active
    FIGURES["scheduler"] = {"room": budget.cache_room, "peak": sch.cache_bytes_peak, "all_together": total}


def test_negative_control_without_a_budget_the_same_jobs_go_over_it(engine):
    """The assertion of the test above, `peak <= room`, fails when the scheduler has no budget."""
    budget = budget_for(engine, 2.5)
    sch, queued, results = run_jobs(engine, None)
    assert queued == 0 and all(evs[-1][0] == "end" for evs in results)
    assert sch.cache_bytes_peak > budget.cache_room
    FIGURES["scheduler_unbudgeted_peak"] = sch.cache_bytes_peak


def test_waiting_for_memory_counts_as_queued_and_fills_the_queue(engine):
    budget = budget_for(engine, 1.5)  # one at a time

    async def main():
        sch = Scheduler(engine, Metrics(), max_batch=16, max_queue=2, budget=budget)
        loop = asyncio.get_running_loop()
        mk = lambda i, n=N_NEW: Job(job_id=f"q{i}", endpoint="execute", loop=loop,  # noqa: E731
                                    seq=engine.start(Request(prompt="Hello.", max_tokens=n, sampling=GREEDY), defer_cache=True))
        for i in range(3):  # one runs, two wait for memory (16 batch slots are free)
            sch.submit(mk(i))
        assert sch.queued == 2
        with pytest.raises(QueueFull):
            sch.submit(mk(3))
        with pytest.raises(TooLarge):  # alone over the budget: refused, whatever the queue
            sch.submit(mk(4, n=budget.max_positions))
        sch.cancel_all("shutdown")
        sch.start()
        sch.stop()
        return sch

    sch = asyncio.run(main())
    assert sch.cache_bytes == 0


def test_default_budget_is_half_of_what_is_available_and_too_small_is_refused(engine):
    b = MemoryBudget.for_model(engine.model, budget_mb=None, max_batch=16, prefill_tokens=64,
                               available=(8 << 30, "MemAvailable"))
    assert b.total == 4 << 30 and "50% of MemAvailable" in b.source
    assert b.max_positions == engine.model.n_ctx
    from llorch_cpud.errors import LlorchError

    with pytest.raises(LlorchError, match="too small for this model"):
        MemoryBudget.for_model(engine.model, budget_mb=1, max_batch=16, prefill_tokens=64)


# ---------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:  # torch writes it: every test that uses it is marked slow
    from make_gpt2_fixture import make_gpt2_fixture

    model = make_gpt2_fixture(tmp_path_factory.mktemp("deep") / "m", n_layer=24, n_embd=128, n_head=4, seed=3)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return model


BURST, BURST_WORDS, BURST_NEW = 8, 240, 16  # ~405 prompt tokens + 16: ~10 MiB of cache each
ROOM_MIB = 23.4  # for caches: two of those requests, not three; and one request of at most ~1000 positions


@pytest.fixture(scope="module")
def deep_engine(deep):
    from llorch_cpud.engine import load_engine

    return load_engine(str(deep))[0]


@pytest.fixture(scope="module")
def budget_mb(deep_engine) -> float:
    """The activation reserve of `serve`'s defaults (--max-batch 16, --prefill-tokens 512) + ROOM_MIB."""
    return round(activation_bytes(deep_engine.model, 16, 512) / MIB + ROOM_MIB, 2)


def start_worker(deep, tmp_path_factory, name, *args):
    """A worker on the deep fixture. `--max-gap 100`: a burst's prompts are prefilled as fast as they come (not
    throttled beside the requests already decoding), so that what the burst holds together is set by the memory
    budget alone, the same in the budgeted run and its bypassed control."""
    w = Worker(deep, tmp_path_factory.mktemp(name), "--max-gap", "100", *args)
    w.start()
    return w


@pytest.fixture(scope="module")
def budgeted(deep, budget_mb, tmp_path_factory):
    w = start_worker(deep, tmp_path_factory, "budgeted", "--memory-budget-mb", str(budget_mb),
                     "--max-queue", str(BURST - 2))
    yield w
    w.stop()


def health(w) -> dict:
    return httpx.get(f"{w.base}/health", timeout=10).json()


def rss(w) -> dict:
    """VmRSS and VmHWM (the peak since the last reset) of the server process, in bytes."""
    lines = Path(f"/proc/{w.proc.pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) * 1024 for k, _, v in (x.partition(":") for x in lines) if k in ("VmRSS", "VmHWM")}


def reset_peak_rss(w) -> None:
    Path(f"/proc/{w.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def execute(base, body, timeout=120) -> list:
    with httpx.Client(timeout=timeout) as c, c.stream("POST", f"{base}/execute", json=body) as r:
        assert r.status_code == 200, r.read()
        return [(ev, json.loads(data)) for ev, data in sse(r)]


@pytest.mark.slow
def test_startup_reports_the_budget(budgeted, budget_mb):
    h = health(budgeted)
    assert h["memory_budget_bytes"] == int(budget_mb * MIB)
    assert h["memory_budget_source"] == f"--memory-budget-mb {budget_mb:g}"
    assert h["kv_cache_bytes_per_position"] == 24 * 2 * 128 * 4 and h["kv_cache_bytes"] == 0
    room = h["memory_budget_bytes"] - h["activation_reserve_bytes"]
    assert h["max_request_positions"] == min(1024, room // h["kv_cache_bytes_per_position"])
    line = next(json.loads(x) for x in budgeted.log_lines() if '"memory budget"' in x)
    assert line["memory_budget_bytes"] == h["memory_budget_bytes"] and line["max_request_positions"] == h["max_request_positions"]
    FIGURES["budgeted_health"] = {k: h[k] for k in ("memory_budget_bytes", "activation_reserve_bytes",
                                                  "kv_cache_bytes_per_position", "max_request_positions")}


@pytest.mark.slow
def test_a_request_over_the_budget_alone_is_400_naming_the_limit_and_others_go_on(budgeted, deep_engine):
    h = health(budgeted)
    limit, n_ctx = h["max_request_positions"], h["context_length"]
    assert limit < n_ctx  # the budget, not the context, is the limit here
    prompt = words(0, 30)
    alone = execute(budgeted.base, {"job_id": "alone", "prompt": prompt, "max_tokens": 200, "temperature": 0})
    got = {}

    def run_beside():
        got["events"] = execute(budgeted.base, {"job_id": "beside", "prompt": prompt, "max_tokens": 200, "temperature": 0})

    t = threading.Thread(target=run_beside)
    t.start()
    while health(budgeted)["active_jobs"] == 0 and t.is_alive():
        time.sleep(0.01)
    n_prompt = alone[-1][1]["prompt_tokens"]
    over = limit - n_prompt + 1  # one position more than the budget holds (still within the context)
    r = httpx.post(f"{budgeted.base}/execute", json={"job_id": "big", "prompt": prompt, "max_tokens": over}, timeout=30)
    assert r.status_code == 400, r.text
    (e,) = r.json()["errors"]
    assert e["field"] == "max_tokens" and e["value"] == over
    assert f"at most {limit - n_prompt} max_tokens" in e["message"] and "memory budget" in e["message"]
    assert f"<= {limit}" in e["constraint"] and "--memory-budget-mb" in e["constraint"]
    r = httpx.post(f"{budgeted.base}/v1/completions", json={"prompt": prompt, "max_tokens": over}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "memory budget" in r.text
    long = next(p for p in (words(0, n) for n in range(limit // 2, limit))
                if limit <= len(deep_engine.tokenizer.encode(p)) < n_ctx)  # within the context, not the budget
    r = httpx.post(f"{budgeted.base}/execute", json={"job_id": "big2", "prompt": long, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "prompt", r.text
    assert "memory budget" in r.json()["errors"][0]["message"]
    with httpx.Client(timeout=30) as c:  # control: one position less fits (the stream is left at once: cancelled)
        with c.stream("POST", f"{budgeted.base}/execute", json={"job_id": "fits", "prompt": prompt,
                                                                 "max_tokens": over - 1}) as r:
            assert r.status_code == 200
        with c.stream("POST", f"{budgeted.base}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "Hi"}], "stream": True}) as r:
            assert r.status_code == 200  # no max_tokens: what the budget leaves, not what the context leaves
            chat_id = r.headers["x-job-id"]
    t.join(120)
    accepted = next(json.loads(x) for x in budgeted.log_lines() if chat_id in x and '"job accepted"' in x)
    assert accepted["prompt_tokens"] + accepted["max_tokens"] == limit
    assert got["events"][-1][0] == "end" and got["events"][-1][1]["tokens_out"] == 200
    text = lambda evs: "".join(d["t"] for ev, d in evs if ev == "token")  # noqa: E731
    assert text(got["events"]) == text(alone)  # unharmed: the same greedy text as alone


def burst(w, n=BURST) -> dict:
    """n requests that fit alone (~10 MiB of cache each) at once, /health polled meanwhile; then one more while
    the n are in (503 when the queue is full). Returns figures; the server's peak RSS is reset just before."""
    httpx.post(f"{w.base}/execute", json={"job_id": "warm", "prompt": "Hi", "max_tokens": 2}, timeout=60).read()
    while health(w)["active_jobs"]:
        time.sleep(0.02)
    reset_peak_rss(w)
    before = rss(w)
    results, polls, stop = [None] * n, [], threading.Event()

    def one(i):
        results[i] = execute(w.base, {"job_id": f"burst{i}", "prompt": words(i, BURST_WORDS), "max_tokens": BURST_NEW,
                                      "temperature": 0})

    def poll():
        while not stop.is_set():
            polls.append(health(w))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    extra = None
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 60 and extra is None and any(t.is_alive() for t in threads):
        h = polls[-1] if polls else {}
        if h.get("active_jobs", 0) + h.get("queued_jobs", 0) == n:
            with httpx.Client(timeout=30) as c, c.stream("POST", f"{w.base}/execute",
                                                          json={"job_id": "extra", "prompt": "Hi", "max_tokens": 2}) as r:
                extra = (r.status_code, r.headers.get("retry-after"), json.loads(r.read()) if r.status_code != 200 else None)
        time.sleep(0.01)
    for t in threads:
        t.join(300)
    stop.set()
    poller.join()
    after = rss(w)
    h = health(w)
    return {"results": results, "extra": extra, "max_active": max(p["active_jobs"] for p in polls),
            "max_queued": max(p["queued_jobs"] for p in polls), "kv_peak": h["kv_cache_peak_bytes"],
            "rss_growth": after["VmHWM"] - before["VmRSS"], "rss_before": before["VmRSS"], "health_after": h}


@pytest.mark.slow
def test_requests_that_fit_alone_but_not_together_all_complete_within_the_budget(budgeted, budget_mb):
    b = burst(budgeted)
    budget = int(budget_mb * MIB)
    assert all(r[-1][0] == "end" and r[-1][1]["tokens_out"] == BURST_NEW for r in b["results"])
    FIGURES["budgeted_burst"] = {k: b[k] for k in ("max_active", "max_queued", "kv_peak", "rss_growth", "rss_before",
                                                   "extra")}
    assert b["max_active"] == 2 and b["max_queued"] == BURST - 2  # the others waited for memory
    assert b["extra"][0] == 503 and b["extra"][1] == "1" and b["extra"][2]["error"]["code"] == "OVERLOADED"
    assert 0 < b["kv_peak"] <= budget - b["health_after"]["activation_reserve_bytes"]
    assert b["rss_growth"] <= budget  # the peak RSS over the idle worker's: caches, activations, everything
    assert b["health_after"]["active_jobs"] == 0 and b["health_after"]["kv_cache_bytes"] == 0


@pytest.mark.slow
def test_negative_control_a_bypassed_budget_lets_the_same_requests_go_over_it(deep, budget_mb, tmp_path_factory):
    """The two assertions of the test above (kv_peak and RSS growth within the budget) fail when the budget is
    bypassed: the same requests run all at once."""
    w = start_worker(deep, tmp_path_factory, "bypassed", "--memory-budget-mb", "100000", "--max-queue", str(BURST - 2))
    try:
        b = burst(w)
    finally:
        w.stop()
    FIGURES["bypassed_burst"] = {k: b[k] for k in ("max_active", "max_queued", "kv_peak", "rss_growth", "rss_before")}
    assert all(r[-1][0] == "end" for r in b["results"]) and b["max_active"] == BURST and b["max_queued"] == 0
    assert b["kv_peak"] > budget_mb * MIB
    assert b["rss_growth"] > budget_mb * MIB


@pytest.mark.slow
def test_a_budget_too_small_for_one_step_fails_startup_in_one_line(deep, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "serve", "--model", str(deep), "--port", "0",
                        "--memory-budget-mb", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: memory budget of 2.0 MiB (--memory-budget-mb 2) is too small"), r.stderr[-2000:]
