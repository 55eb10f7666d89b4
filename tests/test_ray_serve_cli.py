"""`llorch-cpud serve --ray --replicas 2` as a user runs it (README): a subprocess that starts its own local Ray,
serves on loopback, streams, lists both replicas, and on SIGTERM drains, shuts Ray down and exits 0. Bounded:
2 min to become ready, 1 min to exit. Separate from test_ray_serve.py so the two Ray clusters never overlap."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                                   reason="ray[serve] is not installed (pip install 'llorch-cpud[ray]')")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_ray_command(gpt2_small, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "llorch_cpud.cli", "serve", "--ray", "--replicas", "2", "--threads", "1",
                          "--model", str(gpt2_small), "--port", str(port), "--max-batch", "4"],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        ids: set = set()
        while time.monotonic() < deadline and len(ids) < 2:
            assert p.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                r = httpx.get(f"{base}/replicas", timeout=5)
                if r.status_code == 200:
                    ids = {x["replica_id"] for x in r.json()["replicas"]}
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert len(ids) == 2, (tmp_path / "serve.log").read_text()[-3000:]
        body = {"job_id": "cli-1", "prompt": "Hello.", "max_tokens": 8, "temperature": 0.0}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{base}/execute", json=body) as r:
            assert r.status_code == 200 and r.headers["x-llorch-replica"] in ids
            events = [line[len("event: "):] for line in r.iter_lines() if line.startswith("event: ")]
        assert events[0] == "started" and events[-1] == "end"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/health", timeout=5)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        log.close()
