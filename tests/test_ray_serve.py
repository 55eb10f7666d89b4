"""The worker on Ray Serve (server/ray_serve.py, issue 19): 2 replicas of the GPT-2 fixture, 1 thread each, on a
local Ray cluster started by this module (loopback HTTP, usage stats off, no dashboard).

- streams on /execute and /v1/completions give the engine's own greedy text; concurrent requests reach both replicas;
- /health and /metrics answer per replica (X-Llorch-Replica; /replicas/metrics merges every replica's, labelled);
- /cancel reaches the job on whichever replica holds it (forwarded when it lands on the other);
- a replica killed mid-stream cuts its streams detectably (no terminal event / no [DONE]); the others complete,
  retries give the same text, and Serve brings the deployment back to 2 replicas;
- scale-down drains: the stopped replica's streams end with their terminal events.

Each test is bounded (`timeout` on every client call, deadlines on every wait). Skipped without ray[serve].
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray[serve] is not installed (pip install 'llorch-cpud[ray]')")

PROMPTS = ["Hello.", "What is the answer to life, the universe, and everything?", "def fibonacci(n):",
           "Once upon a time", "The capital of France is", "café naïve résumé", "1 2 3 4 5 6", "Dear Alice,"]
N_TOKENS = 24
TIMINGS: dict = {}

sys.path.insert(0, os.path.dirname(__file__))
from test_server import free_port, sse  # noqa: E402


def execute(base, body, timeout=120, on_event=None):
    """One /execute stream: {"replica", "events": [(event, data)], "broken": exception name or None}."""
    out = {"replica": None, "events": [], "broken": None}
    try:
        with httpx.Client(timeout=timeout) as c, c.stream("POST", f"{base}/execute", json=body) as r:
            assert r.status_code == 200, r.read()
            out["replica"] = r.headers.get("x-llorch-replica")
            for ev, data in sse(r):
                out["events"].append((ev, json.loads(data)))
                if on_event is not None:
                    on_event(out)
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        out["broken"] = type(e).__name__
    return out


def text_of(result) -> str:
    return "".join(d["t"] for e, d in result["events"] if e == "token")


def terminal(result):
    ends = [(e, d) for e, d in result["events"] if e in ("end", "error")]
    return ends[-1] if ends else None


def greedy_reference(engine, prompt, n):
    from llorch_cpud.engine import EndEvent, Request
    from llorch_cpud.sampling import SamplingParams

    ends = [e for e in engine.generate(Request(prompt=prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0)))
            if isinstance(e, EndEvent)]
    return ends[0].text


def replicas(state="RUNNING") -> list[dict]:
    from ray.serve.context import _get_global_client

    from llorch_cpud.server.ray_serve import APP_NAME, DEPLOYMENT

    apps = _get_global_client().get_serve_details().get("applications", {})
    dep = apps.get(APP_NAME, {}).get("deployments", {}).get(DEPLOYMENT, {})
    return [r for r in dep.get("replicas", []) if state is None or r["state"] == state]


def wait_for(cond, timeout, every=0.5, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def engine(gpt2_small):
    from llorch_cpud.engine import load_engine

    return load_engine(str(gpt2_small))[0]


@pytest.fixture(scope="module")
def cluster(gpt2_small):
    if not HAVE_RAY:
        pytest.skip("ray[serve] is not installed (pip install 'llorch-cpud[ray]')")
    """Ray on this machine, Serve's proxy on 127.0.0.1, 2 replicas x 1 thread: yields the base URL."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ray
    from ray import serve

    from llorch_cpud.server import ray_serve
    from llorch_cpud.server.app import ServeConfig

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=2, logging_level="WARNING", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = ray_serve.RayOptions(replicas=2, threads=1, drain_grace_s=2.0, health_check_period_s=2.0)
        cfg = ServeConfig(model=str(gpt2_small), max_batch=8)
        serve.run(ray_serve.bind(cfg, opts), name=ray_serve.APP_NAME, route_prefix="/")
        TIMINGS["cluster start + deploy (s)"] = round(time.perf_counter() - t0, 1)
        yield {"base": f"http://127.0.0.1:{port}", "cfg": cfg, "opts": opts, "port": port}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print("\nray serve timings:", json.dumps(TIMINGS))


@pytest.mark.slow
def test_streams_match_the_engine_and_spread_over_both_replicas(cluster, engine):
    base = cluster["base"]
    t0 = time.perf_counter()
    ref = {p: greedy_reference(engine, p, N_TOKENS) for p in PROMPTS}
    bodies = [{"job_id": f"spread-{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": N_TOKENS,
               "temperature": 0.0} for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: execute(base, b, timeout=120), bodies))
    for b, r in zip(bodies, results):
        assert r["broken"] is None and terminal(r)[0] == "end", r
        assert text_of(r) == ref[b["prompt"]], b
    served = {r["replica"] for r in results}
    assert len(served) == 2, f"all 16 requests went to {served}"
    assert served == {r["replica_id"] for r in replicas()}

    # /v1/completions, streamed: the same text, and [DONE] last
    for prompt in PROMPTS[:3]:
        body = {"model": "gpt2", "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0.0, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200
            datas = [d for _, d in sse(r)]
        assert datas[-1] == "[DONE]"
        assert "".join(json.loads(d)["choices"][0]["text"] for d in datas[:-1]) == ref[prompt]
    TIMINGS["test_streams (s)"] = round(time.perf_counter() - t0, 1)


@pytest.mark.slow
def test_health_and_metrics_per_replica(cluster):
    base = cluster["base"]
    ids = {r["replica_id"] for r in replicas()}
    seen = set()
    with httpx.Client(timeout=30) as c:
        for _ in range(40):
            r = c.get(f"{base}/health")
            assert r.status_code == 200
            body = r.json()
            assert body["status"] == "healthy" and body["model_loaded"] is True
            assert body["replica_id"] == r.headers["x-llorch-replica"]
            seen.add(body["replica_id"])
            if seen == ids:
                break
        assert seen == ids
        r = c.get(f"{base}/metrics")
        assert r.status_code == 200 and "llorch_queue_depth" in r.text and r.headers["x-llorch-replica"] in ids
        r = c.get(f"{base}/replicas/metrics")  # every replica's, each sample labelled with its replica
        assert r.status_code == 200 and "x-llorch-replicas-missing" not in r.headers, r.headers
        for rid in ids:
            assert f'llorch_tokens_generated_total{{replica="{rid}"}}' in r.text, r.text[:2000]
        assert r.text.count("# TYPE llorch_tokens_generated_total counter") == 1
        r = c.get(f"{base}/replicas")
        assert {x["replica_id"] for x in r.json()["replicas"]} == ids
    # No socket to another machine: every connection of Ray's processes (this one's descendants) ends on one of
    # this machine's addresses, and Serve's HTTP proxy listens on loopback only.
    import psutil

    own = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    me = psutil.Process()
    listening, remote = set(), set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections("inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in conns:
            if conn.raddr:
                remote.add(conn.raddr.ip.removeprefix("::ffff:"))
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == cluster["port"]:
                listening.add(conn.laddr.ip)
    assert remote and remote <= own, remote - own
    assert listening == {"127.0.0.1"}, listening


@pytest.mark.slow
def test_cancel_reaches_the_replica_holding_the_job(cluster):
    """A /cancel lands on either replica (Serve routes it independently): both paths end the job, and the run
    goes on until one cancel was forwarded to the other replica."""
    base = cluster["base"]
    t0 = time.perf_counter()
    forwarded = local = 0
    for attempt in range(12):
        job_id = f"cancel-{attempt}"
        started = threading.Event()

        def on_event(out):
            if any(e == "token" for e, _ in out["events"]):
                started.set()

        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(execute, base, {"job_id": job_id, "prompt": "Once upon a time", "max_tokens": 1000,
                                              "temperature": 0.0}, 120, on_event)
            wait_for(lambda: started.is_set() or fut.done(), 60, 0.02, "the first token")
            if fut.done():
                fut.result()  # its failure
            r = httpx.post(f"{base}/cancel", json={"job_id": job_id}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["cancelled"] is True
            result = fut.result(timeout=60)
        assert terminal(result) == ("end", terminal(result)[1]) and terminal(result)[1]["stop_reason"] == "cancelled"
        assert terminal(result)[1]["tokens_out"] < 1000
        if "x-llorch-cancelled-on" in r.headers:
            assert r.headers["x-llorch-cancelled-on"] == result["replica"] != r.headers["x-llorch-replica"]
            forwarded += 1
        else:
            assert r.headers["x-llorch-replica"] == result["replica"]
            local += 1
        if forwarded and local:
            break
    assert forwarded, "no /cancel landed on the other replica in 12 tries"
    r = httpx.post(f"{base}/cancel", json={"job_id": "no-such-job"}, timeout=30)
    assert r.status_code == 404 and r.json()["errors"][0]["field"] == "job_id"
    TIMINGS["test_cancel (s)"] = round(time.perf_counter() - t0, 1)


@pytest.mark.slow
def test_killed_replica_cuts_its_streams_detectably_and_the_deployment_recovers(cluster, engine):
    import ray

    base = cluster["base"]
    t0 = time.perf_counter()
    n = 600
    bodies = [{"job_id": f"kill-{i}", "prompt": PROMPTS[i], "max_tokens": n, "temperature": 0.0} for i in range(4)]
    progress = {b["job_id"]: 0 for b in bodies}
    holder = {}
    cmpl = {"replica": None, "datas": [], "broken": None}

    def on_event(out):
        progress[out["events"][0][1]["job_id"]] = len(out["events"])
        holder[out["events"][0][1]["job_id"]] = out["replica"]

    def completions():  # an OpenAI stream beside them, on the replica that will be killed
        body = {"model": "gpt2", "prompt": PROMPTS[5], "max_tokens": n, "temperature": 0.0, "stream": True}
        try:
            with httpx.Client(timeout=180) as c, c.stream("POST", f"{base}/v1/completions", json=body) as r:
                cmpl["replica"] = r.headers.get("x-llorch-replica")
                for _, d in sse(r):
                    cmpl["datas"].append(d)
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            cmpl["broken"] = type(e).__name__

    with cf.ThreadPoolExecutor(len(bodies) + 1) as pool:
        cfut = pool.submit(completions)
        futs = [pool.submit(execute, base, b, 180, on_event) for b in bodies]
        wait_for(lambda: all(v > 3 for v in progress.values()) and len(cmpl["datas"]) > 3, 60, 0.05,
                 "every stream's first tokens")
        victim = next(r for r in replicas() if r["replica_id"] == cmpl["replica"])
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        results = [f.result(timeout=180) for f in futs]
        cfut.result(timeout=180)
    assert "[DONE]" not in cmpl["datas"] and cmpl["datas"], "the cut OpenAI stream must not end with [DONE]"
    assert not any(json.loads(d)["choices"][0]["finish_reason"] for d in cmpl["datas"])
    on_victim = [r for r in results if r["replica"] == victim["replica_id"]]
    on_other = [r for r in results if r["replica"] != victim["replica_id"]]
    for r in on_victim:  # cut: no terminal event, and short of max_tokens
        assert terminal(r) is None, r["events"][-3:]
        assert sum(e == "token" for e, _ in r["events"]) < n
    for r in on_other:
        assert r["broken"] is None and terminal(r)[0] == "end"
        assert text_of(r) == greedy_reference(engine, r["events"][0][1]["job_id"] and
                                              bodies[int(r["events"][0][1]["job_id"].split("-")[1])]["prompt"], n)
    # retries of the cut requests complete on a live replica with the engine's text
    for r in on_victim:
        i = int(r["events"][0][1]["job_id"].split("-")[1])
        again = execute(base, {**bodies[i], "job_id": f"retry-{i}", "max_tokens": 64}, 120)
        assert again["broken"] is None and terminal(again)[0] == "end"
        assert again["replica"] != victim["replica_id"]
        assert text_of(again) == greedy_reference(engine, bodies[i]["prompt"], 64)
    # Serve replaces the dead replica
    back = wait_for(lambda: len(replicas()) == 2 and victim["replica_id"] not in {r["replica_id"] for r in replicas()},
                    120, 1.0, "2 running replicas again")
    assert back
    again = execute(base, {"job_id": "after-kill", "prompt": "Hello.", "max_tokens": 8, "temperature": 0.0}, 60)
    assert terminal(again)[0] == "end" and text_of(again) == greedy_reference(engine, "Hello.", 8)
    TIMINGS["test_kill (s)"] = round(time.perf_counter() - t0, 1)
    TIMINGS["streams cut / completed"] = f"{len(on_victim)}/{len(on_other)}"
    TIMINGS["cut streams ended by"] = sorted({r["broken"] or "end of body without a terminal event"
                                              for r in [*on_victim, cmpl]})


@pytest.mark.slow
def test_redeploy_drains_with_terminal_events(cluster):
    """A new version of the deployment (here: serve.run again, with 1 replica; from Python, Serve rolls out every
    deploy as a new version) stops both old replicas: each stops receiving requests, lets its streams run for the drain
    grace (2 s here), then ends them with `end` / stop_reason `cancelled` - never a cut stream."""
    from ray import serve

    from llorch_cpud.server import ray_serve

    base = cluster["base"]
    t0 = time.perf_counter()
    wait_for(lambda: len(replicas()) == 2, 120, 1.0, "2 running replicas")
    before = {r["replica_id"] for r in replicas()}
    bodies = [{"job_id": f"drain-{i}", "prompt": PROMPTS[i], "max_tokens": 1000, "temperature": 0.0} for i in range(4)]
    progress = {b["job_id"]: 0 for b in bodies}

    def on_event(out):
        progress[out["events"][0][1]["job_id"]] = len(out["events"])

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        futs = [pool.submit(execute, base, b, 180, on_event) for b in bodies]
        wait_for(lambda: all(v > 3 for v in progress.values()), 60, 0.05, "every stream's first tokens")
        opts = ray_serve.RayOptions(**{**cluster["opts"].__dict__, "replicas": 1})
        serve.run(ray_serve.bind(cluster["cfg"], opts), name=ray_serve.APP_NAME, route_prefix="/", blocking=False)
        results = [f.result(timeout=120) for f in futs]
    assert {r["replica"] for r in results} == before, "the streams did not reach both replicas"
    for r in results:
        assert r["broken"] is None, r["events"][-3:]
        assert terminal(r)[0] == "end", r["events"][-3:]
        assert terminal(r)[1]["stop_reason"] == "cancelled" and terminal(r)[1]["tokens_out"] < 1000
    now = wait_for(lambda: len(replicas(None)) == 1 and replicas(), 90, 0.5, "1 new replica")
    assert not before & {r["replica_id"] for r in now}
    again = execute(base, {"job_id": "after-redeploy", "prompt": "Hello.", "max_tokens": 8, "temperature": 0.0}, 60)
    assert terminal(again)[0] == "end"
    TIMINGS["test_drain (s)"] = round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------------------- without a cluster


def test_cli_ray_options_need_ray():
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "serve", "--replicas", "2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --ray-address, --replicas, --min-replicas and " \
                                                     "--max-replicas need --ray", r.stderr


def test_cli_ray_without_ray_installed_is_one_line():
    """`serve --ray` where ray cannot be imported: one line naming the extra, exit 2 (ray hidden from the import)."""
    code = ("import sys; sys.modules['ray'] = None; from llorch_cpud.cli import main; "
            "sys.exit(main(['serve', '--ray', '--replicas', '2']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --ray needs Ray Serve: pip install 'llorch-cpud[ray]'") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr


@needs_ray
def test_health_logic_loaded_engine_thread_and_wedge():
    """LlorchWorker.unhealthy_reason (what check_health raises): on a stand-in replica, no Ray needed."""
    from types import SimpleNamespace

    from llorch_cpud.server.metrics import Metrics
    from llorch_cpud.server.ray_serve import LlorchWorker, RayOptions

    alive = SimpleNamespace(is_alive=lambda: True)
    sch = SimpleNamespace(thread=alive, running=0, queued=0, inbox=[])
    state = SimpleNamespace(status="healthy", engine=object(), scheduler=sch, metrics=Metrics())
    w = SimpleNamespace(state=state, options=RayOptions(wedge_seconds=0.2))
    w._steps = lambda: LlorchWorker._steps(w)
    w._progress = (0.0, time.monotonic())
    check = lambda: LlorchWorker.unhealthy_reason(w)  # noqa: E731
    assert check() is None
    sch.running = 1  # a job, no step: fine until wedge_seconds pass
    assert check() is None
    time.sleep(0.3)
    assert "wedged" in check()
    state.metrics.decode_step(1, 0.01)  # a step finished: healthy again
    assert check() is None
    sch.thread = SimpleNamespace(is_alive=lambda: False)
    assert check() == "engine thread is not running"
    state.status = "draining"
    assert check() is None  # being stopped anyway: not replaced meanwhile
    state.status, state.engine = "loading", None
    assert check() == "worker is loading"


@needs_ray
def test_build_app_arguments():
    from llorch_cpud.server import ray_serve

    seen = {}
    real = ray_serve.bind
    ray_serve.bind = lambda cfg, opts: seen.update(cfg=cfg, opts=opts)
    try:
        ray_serve.build_app({"model": "m", "replicas": "3", "threads": "2", "max_batch": "4", "drain_grace_s": "1.5"})
        assert (seen["cfg"].model, seen["cfg"].max_batch) == ("m", 4)
        assert (seen["opts"].replicas, seen["opts"].threads, seen["opts"].drain_grace_s) == (3, 2, 1.5)
        ray_serve.build_app({"min_replicas": "1", "max-replicas": "4"})
        assert seen["opts"].replicas is None and seen["opts"].max_replicas == 4
        with pytest.raises(ValueError, match="unknown argument"):
            ray_serve.build_app({"replica": "2"})
    finally:
        ray_serve.bind = real


@pytest.mark.slow
def test_autoscaling_burst_scales_out_and_idleness_scales_back(cluster):
    """min 1, max 2 replicas, 1 ongoing request per replica as the target: a burst of 6 streams brings a second
    replica, which serves new requests; once idle (downscale delay 4 s) the deployment returns to 1."""
    from ray import serve

    from llorch_cpud.server import ray_serve

    base = cluster["base"]
    t0 = time.perf_counter()
    opts = ray_serve.RayOptions(**{**cluster["opts"].__dict__, "replicas": None, "min_replicas": 1, "max_replicas": 2,
                                   "target_ongoing_requests": 1.0, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0})
    serve.run(ray_serve.bind(cluster["cfg"], opts), name=ray_serve.APP_NAME, route_prefix="/")
    wait_for(lambda: len(replicas(None)) == 1 and len(replicas()) == 1, 90, 0.5, "1 replica")
    served = set()
    with cf.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(execute, base, {"job_id": f"burst-{i}", "prompt": PROMPTS[i % 8], "max_tokens": 1000,
                                            "temperature": 0.0}, 180) for i in range(6)]
        wait_for(lambda: len(replicas()) == 2, 90, 0.5, "a second replica")
        late = [pool.submit(execute, base, {"job_id": f"late-{i}", "prompt": "Hello.", "max_tokens": 400,
                                            "temperature": 0.0}, 180) for i in range(2)]
        wait_for(lambda: all(f.done() for f in late) or None, 120, 0.5, "the late requests")
        for b in [f"burst-{i}" for i in range(6)]:
            httpx.post(f"{base}/cancel", json={"job_id": b}, timeout=30)
        results = [f.result(timeout=60) for f in futs + late]
    for r in results:
        assert r["broken"] is None and terminal(r)[0] == "end", r["events"][-3:]
        served.add(r["replica"])
    assert len(served) == 2, "the new replica served nothing"
    TIMINGS["autoscale up (s)"] = round(time.perf_counter() - t0, 1)
    wait_for(lambda: len(replicas(None)) == 1, 90, 0.5, "back to 1 replica")
    TIMINGS["test_autoscale (s)"] = round(time.perf_counter() - t0, 1)
