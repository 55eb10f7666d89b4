"""`llorch-cpud bench` end to end on a tiny model: real subprocess runners, our real server for the
concurrency levels, the JSON and table it promises (not its speed: performance targets live in the
benchmark, never in timed tests)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from llorch_cpud.bench import table
from llorch_cpud.bench_server import progress_bar


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
    # the table shows ours/transformers as the median of the per-round ratios
    rounds = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(result["samples"]["ours"], result["samples"]["transformers"])]
    ratio = statistics.median(rounds)
    assert f"{ratio:.2f}x" in table(result) and f"{ratio:.2f}x" in r.stdout
    assert "[####################] 4/4" in r.stderr  # the progress bar reached the end
    conc = result["concurrency"]["servers"]["ours"]
    for level in ("1", "2"):
        assert conc[level]["aggregate_decode_tok_s"] > 0 and conc[level]["health_ms_max"] > 0
        assert len(conc[level]["runs"]) == 2  # one run per round
    # levels interleaved round by round; the scaling is the median of the per-round ratios
    rounds = [b["aggregate_decode_tok_s"] / a["aggregate_decode_tok_s"] for a, b in zip(conc["1"]["runs"], conc["2"]["runs"])]
    assert conc["scaling"] == pytest.approx(statistics.median(rounds))
    assert f"ours: 2 streams / 1 = {conc['scaling']:.2f}x aggregate" in r.stdout  # the concurrency table
    assert "[####################] 4/4 ours x2" in r.stderr


def test_concurrency_ratios_are_medians_of_per_round_ratios():
    from llorch_cpud.bench import concurrency_table
    from llorch_cpud.bench_server import per_round_ratio

    ours = [{"aggregate_decode_tok_s": v} for v in (100.0, 50.0, 90.0)]
    peer = [{"aggregate_decode_tok_s": v} for v in (50.0, 50.0, 30.0)]  # the machine slowed down in round 2
    assert per_round_ratio(ours, peer, "aggregate_decode_tok_s") == 2.0  # ratios 2, 1, 3
    assert per_round_ratio(ours, [{"aggregate_decode_tok_s": None}] * 3, "aggregate_decode_tok_s") is None
    level = {"aggregate_decode_tok_s": 1.0, "min": 1.0, "max": 1.0, "steady_decode_tok_s": None, "per_stream_tok_s": 1.0,
             "ttft_ms": 1.0, "health_ms_max": 1.0}
    conc = {"levels": [1, 8], "servers": {"ours": {"1": level, "8": level, "scaling": 4.5, "steady_scaling": 5.25,
                                                   "vs_llama-server": {"1": 1.1, "8": 1.9}},
                                          "llama-server": {"1": level, "8": level, "scaling": 1.5, "steady_scaling": None}}}
    text = concurrency_table(conc)
    assert "ours: 8 streams / 1 = 4.50x aggregate, steady state 5.25x" in text
    assert "llama-server: 8 streams / 1 = 1.50x aggregate" in text
    assert "ours/llama-server at 8 streams: 1.90x aggregate" in text


def test_bench_rejects_unknown_peer(gpt2_small):
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "bench", "--model", str(gpt2_small), "--peers", "vllm"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--peers: unknown peer 'vllm'" in r.stderr


def test_runner_ratio_is_the_median_of_per_round_ratios():
    from llorch_cpud.bench import ratio

    samples = {"ours": [{"decode_tok_s": v} for v in (100.0, 60.0, 90.0)],
               "peer": [{"decode_tok_s": v} for v in (40.0, 40.0, 30.0)]}  # rounds: 2.5, 1.5, 3.0
    runners = {n: {"decode_tok_s": {"median": statistics.median(s["decode_tok_s"] for s in v)}} for n, v in samples.items()}
    result = {"samples": samples, "runners": runners}
    assert ratio(result, "peer", "decode_tok_s") == 2.5  # not 90 / 40 = 2.25, the ratio of the medians
    assert ratio({"runners": runners}, "peer", "decode_tok_s") == 90.0 / 40.0  # no samples: medians


def test_time_generate_script_times_both_whole_commands(gpt2_small):
    """scripts/time_generate.py (the README's whole-command timing): both sides produce the tokens asked
    for, and the medians and ratios it prints are those of its own rounds."""
    pytest.importorskip("transformers")
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "time_generate.py"
    r = subprocess.run([sys.executable, str(script), str(gpt2_small), "--max-tokens", "5", "--rounds", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    rounds = [ln for ln in lines if ln.startswith("round ")]
    assert len(rounds) == 2 and all("(5 tokens" in ln.split("|")[1] for ln in rounds)  # transformers: exactly 5
    walls = [(float(ln.split("ours ")[1].split(" s")[0]), float(ln.split("transformers ")[1].split(" s")[0]))
             for ln in rounds]
    expect = statistics.median(h / o for o, h in walls)
    got = float(next(ln for ln in lines if ln.startswith("median wall")).rsplit("-> ", 1)[1].rstrip("x"))
    assert abs(got - expect) <= 0.01 * expect + 0.006  # the rounds print milliseconds, the ratio two decimals
