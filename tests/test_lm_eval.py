"""lm-evaluation-harness (PyPI `lm-eval`) as a real client of the worker, and as the reference beside it.

Two runs of the same local tasks (tests/data/lmeval: 20 multiple-choice questions scored by log-likelihood,
6 greedy `generate_until` prompts; JSONL files, no download) on the same weights, the 2-layer GPT-2 fixture:
- `lm_eval --model local-completions` against `llorch-cpud serve` (lm-eval tokenises with the folder's
  tokenizer and sends token ids with echo + logprobs 1 + max_tokens 1);
- `lm_eval --model hf` (transformers, float32) on the folder.
Every per-sample log-likelihood agrees within SPEC checkpoint 8's tolerance (1e-3), the is-greedy flags and
the accuracies are identical, and so are the greedy generations. Both runs are offline (HF_*_OFFLINE=1).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_server import Worker

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TASKS = "llorch_mc,llorch_gen"
TOL = 1e-3
TIMEOUT_S = 600  # each lm_eval run (a few seconds of work; imports and a loaded machine make it more)

pytestmark = pytest.mark.slow


def lm_eval_cmd(model: str, model_args: str, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "lm_eval"
    return [str(exe), "--model", model, "--model_args", model_args, "--tasks", TASKS,
            "--include_path", str(ROOT / "tests" / "data" / "lmeval"), "--batch_size", "1",
            "--log_samples", "--output_path", str(out)]


def run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-4000:]


def samples(out: Path, task: str) -> list[dict]:
    files = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    rows = [json.loads(line) for line in open(files[0])]
    return sorted(rows, key=lambda r: r["doc_id"])


def results(out: Path) -> dict:
    files = glob.glob(str(out / "*" / "results_*.json"))
    assert len(files) == 1, files
    return json.loads(Path(files[0]).read_text())["results"]


def test_local_completions_agrees_with_hf(gpt2_small, tmp_path):
    w = Worker(gpt2_small, tmp_path).start()
    try:
        args = (f"model=gpt2-small,base_url={w.base}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={gpt2_small},num_concurrent=1,max_retries=1")
        run(lm_eval_cmd("local-completions", args, tmp_path / "ours"))
    finally:
        w.stop()
    run(lm_eval_cmd("hf", f"pretrained={gpt2_small},dtype=float32", tmp_path / "hf") + ["--device", "cpu"])

    ours, ref = samples(tmp_path / "ours", "llorch_mc"), samples(tmp_path / "hf", "llorch_mc")
    assert len(ours) == len(ref) == 20
    worst = 0.0
    for a, b in zip(ours, ref):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
        assert len(a["resps"]) == len(b["resps"]) == len(a["doc"]["choices"])
        for (ra,), (rb,) in zip(a["resps"], b["resps"]):
            worst = max(worst, abs(float(ra[0]) - float(rb[0])))
            assert ra[1] == rb[1]  # is_greedy
        assert a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]
    assert worst <= TOL, worst
    print(f"lm-eval llorch_mc: max per-sample log-likelihood difference {worst:.2e} (tolerance {TOL})")
    r_ours, r_ref = results(tmp_path / "ours"), results(tmp_path / "hf")
    for key in ("acc,none", "acc_norm,none"):
        assert r_ours["llorch_mc"][key] == r_ref["llorch_mc"][key]

    gen_ours, gen_ref = samples(tmp_path / "ours", "llorch_gen"), samples(tmp_path / "hf", "llorch_gen")
    assert len(gen_ours) == len(gen_ref) == 6
    assert [s["resps"] for s in gen_ours] == [s["resps"] for s in gen_ref]  # greedy: the same text
    assert r_ours["llorch_gen"]["exact_match,none"] == r_ref["llorch_gen"]["exact_match,none"]
