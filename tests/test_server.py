"""The worker daemon, tested as a real `llorch-cpud serve` process on loopback with real clients.

Two servers are shared by the module:
- `full`: the GPT-2 124M-shaped fixture (slow enough to observe loading, streaming, a long
  prefill, cancellation), started with a ready callback to a test receiver, no API key;
- `small`: the 2-layer fixture plus a chat template, started with `--api-key`.
Reference outputs come from `llorch-cpud generate --json` (a subprocess) or, for the many
gpt2_full prompts, from `Engine.generate` in this process — the very loop the CLI runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from llorch_cpud import kernels

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS8 = ["Hello.", "What is the answer to life, the universe, and everything?", "def fibonacci(n):",
            "Once upon a time", "The capital of France is", "café naïve résumé", "1 2 3 4 5 6", "Dear Alice,"]
FIGURES: dict = {}  # measured numbers, printed at the end of the module


# ---------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_template(src: Path, dst: Path) -> Path:
    """A copy of the model folder `src` at `dst` with CHAT_TEMPLATE as its chat template."""
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return dst


@contextlib.contextmanager
def running(folder: Path, logs: Path, *args: str, headers=None):
    """A Worker on `folder` (serve `args`), started and ready; stopped on exit."""
    w = Worker(folder, logs, *args)
    w.start(headers=headers)
    try:
        yield w
    finally:
        w.stop()


def sse(resp):
    """(event, data) pairs from an httpx streaming response."""
    event, data = None, []
    for line in resp.iter_lines():
        if line == "":
            if event is not None or data:
                yield event or "message", "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        else:
            k, _, v = line.partition(":")
            v = v[1:] if v.startswith(" ") else v
            if k == "event":
                event = v
            elif k == "data":
                data.append(v)


def stream_execute(base, body, headers=None, timeout=120, on_event=None):
    """Run one /execute; return [(event, data dict, arrival time)] in order."""
    out = []
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", f"{base}/execute", json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for ev, data in sse(r):
                out.append((ev, json.loads(data), time.perf_counter()))
                if on_event is not None and on_event(out) is False:
                    break
    return out


def text_of(events) -> str:
    return "".join(d["t"] for e, d, _ in events if e == "token")


def generate_cli(model, prompt, *args) -> dict:
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "generate", "--model", str(model), "--json", *args, prompt],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class CallbackReceiver:
    def __init__(self):
        self.payloads, self.times = [], []
        receiver = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length", 0))
                receiver.payloads.append(json.loads(self.rfile.read(n)))
                receiver.times.append(time.perf_counter())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ready"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


class Worker:
    """A `llorch-cpud serve` subprocess; start() polls /health from the very beginning and records what it saw."""

    def __init__(self, model, tmp: Path, *args):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.err_path = tmp / f"serve-{self.port}.stderr"
        self.args = ["--model", str(model), "--port", str(self.port), *args]
        self.seen: list[tuple[float, int, dict, float]] = []  # (t, status, body, latency)
        self.execute_while_loading = None

    def start(self, timeout=120, headers=None):
        self.t0 = time.perf_counter()
        self.err = open(self.err_path, "w")
        env = {k: v for k, v in os.environ.items() if k != "LLORCH_API_KEY"}
        self.proc = subprocess.Popen([sys.executable, "-m", "llorch_cpud.cli", "serve", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=self.err, env=env)
        with httpx.Client(timeout=5) as c:
            while time.perf_counter() - self.t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}: {self.err_path.read_text()[-2000:]}")
                try:
                    t = time.perf_counter()
                    r = c.get(f"{self.base}/health")
                    self.seen.append((t - self.t0, r.status_code, r.json(), time.perf_counter() - t))
                    if r.status_code == 503 and self.execute_while_loading is None:
                        self.execute_while_loading = c.post(f"{self.base}/execute", headers=headers,
                                                            json={"job_id": "early", "prompt": "Hi", "max_tokens": 1})
                    if r.status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"server not healthy after {timeout}s")

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()
        return self.proc.returncode

    def log_lines(self) -> list[str]:
        return self.err_path.read_text().splitlines()


class HealthProbe:
    """Polls /health from a thread every `every` seconds, recording each latency."""

    def __init__(self, base, every=0.02):
        self.base, self.every = base, every
        self.samples: list[tuple[float, float, int]] = []  # (start time, latency, status)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                r = c.get(f"{self.base}/health")
                self.samples.append((t, time.perf_counter() - t, r.status_code))
                time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def latencies(self, start=None, end=None):
        return [lat for t, lat, _ in self.samples if (start is None or t >= start) and (end is None or t + lat <= end)]


def summary(lat):
    return {"n": len(lat), "p50_ms": round(statistics.median(lat) * 1000, 2), "max_ms": round(max(lat) * 1000, 2)}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def receiver():
    r = CallbackReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def full(gpt2_full, tmp_path_factory, receiver):
    w = Worker(gpt2_full, tmp_path_factory.mktemp("full"), "--callback-url", receiver.url, "--worker-id", "w-test")
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def small_model(gpt2_small, tmp_path_factory) -> Path:
    return with_template(gpt2_small, tmp_path_factory.mktemp("small_chat") / "gpt2_small_chat")


@pytest.fixture(scope="module")
def small(small_model, tmp_path_factory):
    with running(small_model, tmp_path_factory.mktemp("small"), "--api-key", KEY, headers=AUTH) as w:
        yield w


@pytest.fixture(scope="module")
def full_engine(gpt2_full):
    from llorch_cpud.engine import load_engine

    return load_engine(str(gpt2_full))[0]


def greedy_reference(engine, prompt, n):
    from llorch_cpud.engine import EndEvent, Request
    from llorch_cpud.sampling import SamplingParams

    ends = [e for e in engine.generate(Request(prompt=prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0)))
            if isinstance(e, EndEvent)]
    return ends[0].text


# ---------------------------------------------------------------------------- start-up


def test_health_loading_then_ready_and_callback(full, receiver):
    statuses = [s for _, s, _, _ in full.seen]
    assert 503 in statuses, f"never saw the loading state: {full.seen[:3]}"
    first_loading = next(b for _, s, b, _ in full.seen if s == 503)
    assert first_loading["status"] == "loading" and first_loading["model_loaded"] is False
    assert statuses[-1] == 200 and all(s == 503 for s in statuses[:-1])
    assert full.execute_while_loading is not None and full.execute_while_loading.status_code == 503
    loading_lat = [lat for _, s, _, lat in full.seen if s == 503]
    FIGURES["health_while_loading"] = summary(loading_lat)  # reported, not asserted: it depends on the machine
    # /health answers while the weights load, not only before the loader starts or after it ends: the worker's
    # own memory figure grows between two "loading" answers, so the loader made progress between them and
    # /health was served in between (a loader holding the GIL for the whole load leaves one answer, or
    # several with the same figure). Ordered by the worker's state, not by elapsed time.
    loading = [(round(t, 3), b["memory_bytes"]) for t, s, b, _ in full.seen if s == 503]
    assert len(loading) >= 2, f"(t s, memory bytes) of the loading answers: {loading}"
    assert loading[-1][1] > loading[0][1], f"no loader progress between the loading answers: {loading}"

    body = httpx.get(f"{full.base}/health").json()
    assert body["status"] == "healthy" and body["model_loaded"] is True
    assert body["vram_bytes"] == 0 and body["memory_type"] == "cpu"
    assert body["worker_id"] == "w-test" and body["memory_bytes"] > 100_000_000
    assert body["numerics"] == "float32"  # the default; `serve --numerics q8` reports q8
    # the kernel path the engine runs, as `llorch-cpud info` reports it
    assert body["decode_path"] == ("fused" if kernels.enabled() else "numpy")
    assert body["kernels"] == (kernels.info()["tier"] if kernels.enabled() else "numpy")

    deadline = time.time() + 10
    while not receiver.payloads and time.time() < deadline:
        time.sleep(0.05)
    assert len(receiver.payloads) == 1
    p = receiver.payloads[0]
    assert p["worker_id"] == "w-test" and p["vram_bytes"] == 0
    assert p["uri"] == full.base
    assert isinstance(p["memory_bytes"], int) and p["memory_bytes"] > 100_000_000


def test_callback_that_never_succeeds_fails_startup(gpt2_small, tmp_path):
    port, dead = free_port(), free_port()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "serve", "--model", str(gpt2_small), "--port", str(port),
                        "--callback-url", f"http://127.0.0.1:{dead}/ready", "--callback-attempts", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ready callback to http://127.0.0.1:") and "after 2 attempts" in last
    assert time.perf_counter() - t0 < 30


def test_bad_model_and_bad_port_fail_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "serve", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr


def test_bad_tokenizer_fails_before_listening_naming_the_file(gpt2_small, tmp_path):
    d = tmp_path / "bad_tok"
    shutil.copytree(gpt2_small, d)
    (d / "merges.txt").write_text("#version: 0.2\nthree parts here\n")
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "serve", "--model", str(d), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "merges.txt" in last and "malformed" in last, r.stderr
    assert "Traceback" not in r.stderr and '"listening"' not in r.stderr  # the tokenizer is built before the worker listens


# ---------------------------------------------------------------------------- /execute on the small model


@pytest.fixture(scope="module")
def references(small_model):
    """`llorch-cpud generate --json` outputs, computed once."""
    return {
        "greedy": generate_cli(small_model, "Hello.", "--max-tokens", "24", "--temperature", "0"),
        "sampled": generate_cli(small_model, "The capital of France is", "--max-tokens", "24", "--temperature", "0.9",
                                "--top-k", "40", "--top-p", "0.95", "--seed", "1234"),
        "chat": generate_cli(small_model, "Hello.", "--chat", "--max-tokens", "12", "--temperature", "0"),
    }


def test_event_order_and_greedy_text_equals_generate(small, references):
    ref = references["greedy"]
    evs = stream_execute(small.base, {"job_id": "g1", "prompt": "Hello.", "max_tokens": 24, "temperature": 0}, AUTH)
    kinds = [e for e, _, _ in evs]
    assert kinds[0] == "started" and kinds[-1] == "end" and kinds[-2] == "metrics"
    assert set(kinds[1:-2]) <= {"token"}
    assert sum(k in ("end", "error") for k in kinds) == 1
    started, end = evs[0][1], evs[-1][1]
    assert started["job_id"] == "g1" and started["model"] == "gpt2_small_chat"
    assert "T" in started["started_at"] and started["started_at"].endswith("Z")
    assert [d["i"] for e, d, _ in evs if e == "token"] == list(range(kinds.count("token")))
    assert text_of(evs) == ref["text"]
    assert end["tokens_out"] == len(ref["token_ids"]) and end["stop_reason"] == ref["stop_reason"] == "max_tokens"
    assert end["decode_time_ms"] >= 0 and isinstance(end["seed"], int) and "stop_sequence_matched" not in end


def test_seeded_sampling_equals_generate_and_repeats(small, references):
    ref = references["sampled"]
    body = {"job_id": "s1", "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0.9, "top_k": 40,
            "top_p": 0.95, "seed": 1234}
    a = stream_execute(small.base, body, AUTH)
    b = stream_execute(small.base, {**body, "job_id": "s2", "model": "x", "max_token": 3}, AUTH)  # unknown fields
    assert text_of(a) == text_of(b) == ref["text"]
    assert a[-1][1]["seed"] == 1234
    assert "ignored_fields" not in a[0][1] and b[0][1]["ignored_fields"] == ["max_token", "model"]


def test_stop_sequence_not_emitted_and_reported(small, small_model, references):
    words = references["greedy"]["text"].split()
    stop = words[len(words) // 2]
    ref = generate_cli(small_model, "Hello.", "--max-tokens", "24", "--temperature", "0", "--stop", stop)
    evs = stream_execute(small.base, {"job_id": "st", "prompt": "Hello.", "max_tokens": 24, "temperature": 0,
                                      "stop": [stop]}, AUTH)
    end = evs[-1][1]
    assert end["stop_reason"] == "stop_sequence" and end["stop_sequence_matched"] == stop
    assert text_of(evs) == ref["text"] and stop not in text_of(evs)


VALID = {"job_id": "v", "prompt": "Hello.", "max_tokens": 4}
BAD = {  # field -> an invalid value
    "job_id": "",
    "prompt": "",
    "max_tokens": 0,
    "temperature": 2.5,
    "seed": -1,
    "top_p": 1.5,
    "top_k": -1,
    "repetition_penalty": 2.1,
    "min_p": -0.1,
    "stop": ["a", "b", "c", "d", "e"],
}
MORE_BAD = [("max_tokens", 2049), ("max_tokens", "4"), ("temperature", "hot"), ("seed", 2**64), ("top_k", 1.5),
            ("stop", [""]), ("stop", ["x" * 101]), ("stop", "abc"), ("prompt", "x" * 32769), ("job_id", 7)]


def post(base, body, headers=AUTH, path="/execute"):
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("field,value", list(BAD.items()) + MORE_BAD)
def test_each_invalid_field_alone(small, field, value):
    r = post(small.base, {**VALID, field: value})
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert [e["field"] for e in errors] == [field]
    e = errors[0]
    assert set(e) == {"field", "constraint", "message", "value"} and e["constraint"] and e["message"]


def test_all_invalid_fields_together_and_missing(small):
    r = post(small.base, dict(BAD))
    assert r.status_code == 400
    assert sorted(e["field"] for e in r.json()["errors"]) == sorted(BAD)
    r = post(small.base, {})
    assert r.status_code == 400
    missing = {e["field"]: e for e in r.json()["errors"]}
    assert set(missing) == {"job_id", "prompt", "max_tokens"} and missing["prompt"]["value"] is None
    r = httpx.post(f"{small.base}/execute", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "body"
    r = httpx.post(f"{small.base}/execute", content=b"{not json", headers=AUTH)  # no Content-Type: 415 (issue 15)
    assert r.status_code == 415 and r.json()["errors"][0]["field"] == "body"


def test_context_overflow_names_the_field(small):
    long_prompt = "hello " * 1100  # > 1024 tokens
    r = post(small.base, {**VALID, "prompt": long_prompt, "temperature": 9})
    assert r.status_code == 400
    assert sorted(e["field"] for e in r.json()["errors"]) == ["prompt", "temperature"]
    r = post(small.base, {**VALID, "max_tokens": 2048})
    assert r.status_code == 400
    [e] = r.json()["errors"]
    assert e["field"] == "max_tokens" and "1024" in e["message"]


def test_auth_required_except_health(small, full):
    for method, path in [("POST", "/execute"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/cancel"),
                         ("POST", "/v1/completions")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, f"{small.base}{path}", json=VALID, headers=headers)
            assert r.status_code == 401, (path, headers)
    assert httpx.get(f"{small.base}/health").status_code == 200
    assert httpx.get(f"{small.base}/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{full.base}/v1/models").status_code == 200  # auth off: no header needed


def test_correlation_id_echoed(small):
    r = httpx.get(f"{small.base}/metrics", headers={**AUTH, "X-Correlation-ID": "corr-42"})
    assert r.headers["x-correlation-id"] == "corr-42"
    assert len(httpx.get(f"{small.base}/health").headers["x-correlation-id"]) >= 16  # generated when absent
    with httpx.stream("POST", f"{small.base}/execute", json={**VALID, "job_id": "cid"},
                      headers={**AUTH, "X-Correlation-ID": "corr-43"}) as r:
        assert r.headers["x-correlation-id"] == "corr-43"
        r.read()
    time.sleep(0.2)
    lines = [json.loads(x) for x in small.log_lines()]  # every stderr line is one JSON object
    assert any(x.get("correlation_id") == "corr-43" and x.get("job_id") == "cid" and x["msg"] == "job finished"
               for x in lines)


# ---------------------------------------------------------------------------- OpenAI compatibility (small)


def test_v1_completions_equals_generate(small, references):
    ref = references["greedy"]
    r = post(small.base, {"prompt": "Hello.", "max_tokens": 24, "temperature": 0}, path="/v1/completions")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == ref["text"]
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 24


def test_openai_client_completions_streaming_and_not(small, references):
    import openai

    client = openai.OpenAI(base_url=f"{small.base}/v1", api_key=KEY, max_retries=0)
    [m] = client.models.list().data
    assert m.id == "gpt2_small_chat"
    ref = references["sampled"]
    kw = dict(model=m.id, prompt="The capital of France is", max_tokens=24, temperature=0.9, top_p=0.95, seed=1234,
              extra_body={"top_k": 40})
    c = client.completions.create(**kw)
    assert c.choices[0].text == ref["text"]
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=m.id, prompt="x", max_tokens=4, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{small.base}/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_chat_streaming_and_not(small, references, full):
    import openai

    ref = references["chat"]
    client = openai.OpenAI(base_url=f"{small.base}/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Hello."}]
    c = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0)
    assert c.choices[0].message.content == ref["text"] and c.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref["text"]
    assert chunks[-1].usage.completion_tokens == 12
    no_template = openai.OpenAI(base_url=f"{full.base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="chat template"):
        no_template.chat.completions.create(model="m", messages=msgs, max_tokens=4)


# ---------------------------------------------------------------------------- the full-size model


def test_first_token_arrives_well_before_last(full):
    t0 = time.perf_counter()
    evs = stream_execute(full.base, {"job_id": "ttft", "prompt": "Hello.", "max_tokens": 32, "temperature": 0})
    times = [t - t0 for e, _, t in evs if e == "token"]
    first, last = times[0], times[-1]
    FIGURES["stream_32_tokens"] = {"first_token_s": round(first, 3), "last_token_s": round(last, 3)}
    assert len(times) >= 25
    assert first < 0.25 * last, (first, last)  # streamed as produced, not collected first


def test_eight_concurrent_streams_exact_and_health_answers(full, full_engine):
    n = 16
    refs = {p: greedy_reference(full_engine, p, n) for p in PROMPTS8}
    results, errors = {}, []

    def client(i, p):
        try:
            results[p] = stream_execute(full.base, {"job_id": f"c{i}", "prompt": p, "max_tokens": n, "temperature": 0})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(PROMPTS8)]
    with HealthProbe(full.base) as probe:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t1 = time.perf_counter()
    assert not errors, errors
    for p in PROMPTS8:
        assert text_of(results[p]) == refs[p], p
        assert results[p][-1][1]["tokens_out"] == n
    lat = probe.latencies(t0, t1)
    FIGURES["health_during_8_streams"] = {**summary(lat), "wall_s": round(t1 - t0, 2)}
    # answered all along, never held for the streams' duration (the latencies are reported, not bounded: a shared
    # machine sets them; a /health that waited for the engine would answer a few times, each after most of the work)
    assert len(lat) >= 10 and max(lat) < 0.5 * (t1 - t0), summary(lat)
    metrics = httpx.get(f"{full.base}/metrics").text
    rows = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("llorch_decode_batch_rows_max")))
    assert rows >= 2  # decode steps were batched


def test_health_answers_during_long_prefill(full, full_engine):
    ids = full_engine.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 120)[:900]
    prompt = full_engine.tokenizer.decode(ids)
    first = {}

    def on_event(evs):
        if evs[-1][0] == "token" and "t" not in first:
            first["t"] = evs[-1][2]

    with HealthProbe(full.base, every=0.01) as probe:
        t0 = time.perf_counter()
        evs = stream_execute(full.base, {"job_id": "long", "prompt": prompt, "max_tokens": 2, "temperature": 0},
                             on_event=on_event)
        time.sleep(0.05)
    end = evs[-1][1]
    assert 850 <= end["prompt_tokens"] <= 950
    lat = probe.latencies(t0, first["t"])  # probes that started and finished while the prefill ran
    FIGURES["health_during_900_token_prefill"] = {**summary(lat), "prefill_ms": end["prefill_time_ms"]}
    # answered all along the prefill, never held for it (latencies reported, not bounded: see the test above)
    assert len(lat) >= 5 and max(lat) < 0.5 * (first["t"] - t0), summary(lat)


def test_disconnect_frees_job_and_next_request_served(full):
    def stop_after_three(evs):
        return sum(e == "token" for e, _, _ in evs) < 3

    evs = stream_execute(full.base, {"job_id": "gone", "prompt": "Hello.", "max_tokens": 900, "temperature": 0},
                         on_event=stop_after_three)
    assert [e for e, _, _ in evs][-1] == "token"
    deadline = time.time() + 5
    while time.time() < deadline:
        h = httpx.get(f"{full.base}/health").json()
        if h["active_jobs"] == 0 and h["queued_jobs"] == 0:
            break
        time.sleep(0.02)
    assert h["active_jobs"] == 0 and h["status"] == "healthy"
    # the job id is free again, and the next request is served
    evs = stream_execute(full.base, {"job_id": "gone", "prompt": "Hello.", "max_tokens": 3, "temperature": 0})
    assert evs[-1][0] == "end" and evs[-1][1]["tokens_out"] == 3
    assert 'outcome="disconnected"' in httpx.get(f"{full.base}/metrics").text


def test_cancel_stops_within_a_step_and_duplicate_job_id(full):
    seen = {}

    def cancel_after_two(evs):
        if sum(e == "token" for e, _, _ in evs) == 2 and "r" not in seen:
            dup = post(full.base, {"job_id": "cx", "prompt": "x", "max_tokens": 1}, headers=None)
            seen["dup"] = dup
            seen["r"] = post(full.base, {"job_id": "cx"}, headers=None, path="/cancel")
            seen["n_at_cancel"] = sum(e == "token" for e, _, _ in evs)

    evs = stream_execute(full.base, {"job_id": "cx", "prompt": "Hello.", "max_tokens": 900, "temperature": 0},
                         on_event=cancel_after_two)
    assert seen["r"].status_code == 200 and seen["r"].json()["cancelled"] is True
    assert seen["dup"].status_code == 409 and seen["dup"].json()["errors"][0]["field"] == "job_id"
    end = evs[-1][1]
    assert evs[-1][0] == "end" and end["stop_reason"] == "cancelled"
    tokens_after = sum(e == "token" for e, _, _ in evs) - seen["n_at_cancel"]
    # The cancel lands within a step; tokens produced before it but not yet read by this client (in flight
    # on a loaded machine) still arrive, so allow a few.
    assert tokens_after <= 5, tokens_after
    assert end["tokens_out"] < 20
    assert post(full.base, {"job_id": "cx"}, headers=None, path="/cancel").status_code == 404


def test_metrics_prometheus_text(full):
    r = httpx.get(f"{full.base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples, types = {}, {}
    import re

    pat = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')
    for line in r.text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            m = pat.match(line)
            assert m, line
            float(m.group(4))
            samples.setdefault(m.group(1), []).append(line)
    for name, kind in [("llorch_requests_total", "counter"), ("llorch_tokens_generated_total", "counter"),
                       ("llorch_queue_depth", "gauge"), ("llorch_decode_tokens_per_second", "gauge")]:
        assert types[name] == kind
    assert any('outcome="max_tokens"' in s for s in samples["llorch_requests_total"])
    assert any('outcome="cancelled"' in s for s in samples["llorch_requests_total"])
    assert float(samples["llorch_tokens_generated_total"][0].split()[-1]) > 100


def test_logs_are_json_with_job_ids(full):
    lines = [json.loads(x) for x in full.log_lines()]
    assert any(x["msg"] == "model loaded" for x in lines)
    finished = [x for x in lines if x["msg"] == "job finished"]
    assert {"c0", "c7", "long", "gone", "cx"} <= {x["job_id"] for x in finished}


def test_sigterm_ends_inflight_stream_and_exits_zero(full):
    """Last: it stops the shared server."""
    got = {}

    def term_after_first(evs):
        if evs[-1][0] == "token" and "sent" not in got:
            full.proc.send_signal(signal.SIGTERM)
            got["sent"] = time.perf_counter()

    evs = stream_execute(full.base, {"job_id": "term", "prompt": "Hello.", "max_tokens": 900, "temperature": 0},
                         on_event=term_after_first)
    assert full.proc.wait(30) == 0
    kinds = [e for e, _, _ in evs]
    assert kinds[-1] == "end" and evs[-1][1]["stop_reason"] == "cancelled"
    assert sum(k in ("end", "error") for k in kinds) == 1
    assert evs[-1][2] - got["sent"] < 2.0


def test_serve_numerics_q8_reports_and_streams_what_generate_does(smollm2_gguf, tmp_path):
    """`serve --numerics q8` runs the q8 products: /health says so and a greedy stream equals
    `generate --numerics q8` (that the mode changes the numbers is tests/test_numerics_q8.py's)."""
    from llorch_cpud import kernels

    if not kernels.available():
        pytest.skip("C kernels not built")
    prompt = "Write one sentence about the sea."
    w = Worker(smollm2_gguf, tmp_path, "--numerics", "q8").start()
    try:
        health = httpx.get(f"{w.base}/health").json()
        events = stream_execute(w.base, {"job_id": "q8", "prompt": prompt, "max_tokens": 24, "temperature": 0.0})
    finally:
        w.stop()
    assert health["numerics"] == "q8"
    cli = generate_cli(smollm2_gguf, prompt, "--numerics", "q8", "--temperature", "0", "--max-tokens", "24")
    assert text_of(events) == cli["text"] and events[-1][0] == "end"
