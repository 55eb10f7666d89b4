"""`llorch-cpud bench` end to end on a tiny model: real subprocess runners, our real server for the
concurrency levels, the JSON and table it promises (not its speed: performance targets live in the
benchmark, never in timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llorch_cpud.bench import progress_bar, table


def test_progress_bar():
    assert progress_bar(0, 4) == "[--------------------] 0/4"
    assert progress_bar(2, 4) == "[##########----------] 2/4"
    assert progress_bar(4, 4) == "[####################] 4/4"


def test_bench_runs_ours_and_transformers_and_concurrency(gpt2_small, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "bench", "--model", str(gpt2_small),
                        "--peers", "transformers", "--prompt-tokens", "8", "--new-tokens", "6", "--repeats", "2",
                        "--concurrency", "1,2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["runners"]) == {"ours", "transformers"}
    for name in ("ours", "transformers"):
        samples = result["samples"][name]
        assert len(samples) == 2  # two alternating repetitions each
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb"):
            s = result["runners"][name][key]
            assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    # the table shows the ratio ours/transformers of the medians
    ratio = result["runners"]["ours"]["decode_tok_s"]["median"] / result["runners"]["transformers"]["decode_tok_s"]["median"]
    assert f"{ratio:.2f}x" in table(result) and f"{ratio:.2f}x" in r.stdout
    assert "[####################] 4/4" in r.stderr  # the progress bar reached the end
    conc = result["concurrency"]["servers"]["ours"]
    for level in ("1", "2"):
        assert conc[level]["aggregate_decode_tok_s"] > 0 and conc[level]["health_ms_max"] > 0
    assert conc["scaling"] == pytest.approx(conc["2"]["aggregate_decode_tok_s"] / conc["1"]["aggregate_decode_tok_s"])
    assert f"ours: 2 streams / 1 stream = {conc['scaling']:.2f}x aggregate" in r.stdout  # the concurrency table


def test_bench_rejects_unknown_peer(gpt2_small):
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "bench", "--model", str(gpt2_small), "--peers", "vllm"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--peers: unknown peer 'vllm'" in r.stderr
