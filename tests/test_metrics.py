"""GET /metrics read by prometheus_client's own parser (not ours): names, types, and counters that move with requests.

A real `llorch-cpud serve` process on the 2-layer fixture; the scrape is parsed with
`prometheus_client.parser.text_string_to_metric_families`. Between two scrapes with nothing in
between no counter moves (the negative control); after two generations and one invalid request
exactly the matching counters move, by the amounts the SSE streams report.
"""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llorch_cpud.server.metrics import Metrics
from test_server import Worker, stream_execute

COUNTERS = ["llorch_requests_total", "llorch_tokens_generated_total", "llorch_prompt_tokens_total",
            "llorch_prefill_steps_total", "llorch_prefill_seconds_total", "llorch_decode_steps_total",
            "llorch_decode_seconds_total", "llorch_decode_tokens_total"]
GAUGES = ["llorch_decode_batch_rows_max", "llorch_decode_tokens_per_second", "llorch_uptime_seconds",
          "llorch_queue_depth", "llorch_active_jobs", "llorch_memory_bytes", "llorch_model_loaded"]
TTFT = "llorch_time_to_first_token_seconds"


@pytest.fixture(scope="module")
def worker(gpt2_small, tmp_path_factory):
    w = Worker(gpt2_small, tmp_path_factory.mktemp("metrics"), "--max-batch", "2")
    w.start()
    yield w
    w.stop()


def parse(text: str) -> tuple[dict, dict]:
    """({(sample name, sorted labels): value}, {exposed family name: type})."""
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name + ("_total" if fam.type == "counter" else "")] = fam.type
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, key
            samples[key] = s.value
    return samples, types


def scrape(base) -> tuple[dict, dict]:
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def val(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counter_samples(samples) -> dict:
    return {k: v for k, v in samples.items() if k[0] in COUNTERS or k[0].startswith(TTFT)}


def test_names_and_types_through_prometheus_parser(worker):
    samples, types = scrape(worker.base)
    for name in COUNTERS:
        assert types.get(name) == "counter", (name, types.get(name))
    for name in GAUGES:
        assert types.get(name) == "gauge", (name, types.get(name))
    assert types[TTFT] == "histogram"
    assert val(samples, "llorch_model_loaded") == 1
    assert val(samples, f"{TTFT}_bucket", le="+Inf") == val(samples, f"{TTFT}_count")
    assert not any(name.endswith("_created") for name, _ in samples)  # render() leaves those out


def test_counters_move_with_requests_and_only_then(worker):
    before, _ = scrape(worker.base)
    again, _ = scrape(worker.base)
    # Negative control: nothing happened between the two scrapes, so no counter (or histogram sample) moved.
    assert counter_samples(again) == counter_samples(before)

    # A rejected request: its outcome moves by one, and nothing else (no prompt, no token, no step, no TTFT).
    r = httpx.post(f"{worker.base}/execute", json={"job_id": "bad", "prompt": "x", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400
    rejected, _ = scrape(worker.base)
    invalid = ("llorch_requests_total", (("endpoint", "execute"), ("outcome", "invalid")))
    assert rejected[invalid] - again.get(invalid, 0.0) == 1
    assert {k: v for k, v in counter_samples(rejected).items() if k != invalid} == \
        {k: v for k, v in counter_samples(again).items() if k != invalid}

    ends = []
    for i, prompt in enumerate(["Hello.", "The quick brown fox"]):
        evs = stream_execute(worker.base, {"job_id": f"m{i}", "prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert evs[-1][0] == "end", evs[-1]
        ends.append(evs[-1][1])
    after, _ = scrape(worker.base)

    def moved(name, **labels):
        return val(after, name, **labels) - val(rejected, name, **labels)

    assert [e["stop_reason"] for e in ends] == ["max_tokens"] * 2 and sum(e["tokens_out"] for e in ends) == 10
    assert moved("llorch_requests_total", endpoint="execute", outcome="max_tokens") == 2
    assert moved("llorch_tokens_generated_total") == 10
    assert moved("llorch_prefill_steps_total") >= 1 and moved("llorch_decode_steps_total") >= 1
    assert moved("llorch_decode_tokens_total") == 10 - 2  # each request's first token comes from its prefill step
    assert moved("llorch_prompt_tokens_total") > 0 and moved("llorch_prefill_seconds_total") > 0
    assert moved(f"{TTFT}_count") == 2 and moved(f"{TTFT}_bucket", le="+Inf") == 2
    # Negative control: outcomes and endpoints nobody produced did not move (absent counts as 0).
    assert moved("llorch_requests_total", endpoint="execute", outcome="invalid") == 0
    for outcome in ("cancelled", "disconnected", "eos", "stop_sequence", "conflict", "overloaded", "error", "timeout"):
        assert moved("llorch_requests_total", endpoint="execute", outcome=outcome) == 0, outcome
    for endpoint in ("completions", "chat_completions"):
        assert not any(k[0] == "llorch_requests_total" and ("endpoint", endpoint) in k[1] for k in after), endpoint


def test_each_metrics_has_its_own_registry():
    """Two servers in one process: separate registries, no duplicate-name error, no shared counts."""
    a, b = Metrics(), Metrics()
    a.request("execute", "max_tokens")
    a.tokens(7)
    a.gauge("llorch_queue_depth", "Jobs waiting.", lambda: 3)
    a.gauge("llorch_queue_depth", "Jobs waiting.", lambda: 4)  # replaced, not a duplicate
    b.gauge("llorch_queue_depth", "Jobs waiting.", lambda: 0)
    sa, _ = parse(a.render().decode())
    sb, _ = parse(b.render().decode())
    assert val(sa, "llorch_requests_total", endpoint="execute", outcome="max_tokens") == 1
    assert val(sb, "llorch_requests_total", endpoint="execute", outcome="max_tokens") == 0
    assert (val(sa, "llorch_tokens_generated_total"), val(sb, "llorch_tokens_generated_total")) == (7, 0)
    assert (val(sa, "llorch_queue_depth"), val(sb, "llorch_queue_depth")) == (4, 0)
    assert a.tokens_generated == 7 and b.tokens_generated == 0


def test_recording_api_and_snapshots():
    m = Metrics()
    m.prefill_step(12, 0.5)
    m.decode_step(3, 0.25)
    m.decode_step(2, 0.25)
    m.first_token(0.03)
    s, _ = parse(m.render().decode())
    assert m.prefill == {"steps": 1, "seconds": 0.5, "tokens": 12}
    assert m.decode == {"steps": 2, "seconds": 0.5, "tokens": 5, "rows_max": 3}
    assert val(s, "llorch_decode_batch_rows_max") == 3 and val(s, "llorch_decode_tokens_per_second") == 10.0
    assert val(s, f"{TTFT}_bucket", le="0.025") == 0 and val(s, f"{TTFT}_bucket", le="0.05") == 1
    assert json.loads(json.dumps(m.prefill)) == m.prefill
