"""The llama.cpp reference (llorch_cpud/validate/references/llamacpp_ref.py) and what the harness does with a
reference that cannot expose everything.

Without llama.cpp (the default test run: llama-cpp-python is not in the main venv and takes minutes to build):
- a stub reference that gives logits only: checkpoints 1-7 are reported "n/a" (not compared, not a failure,
  the reason shown), a broken KV cache still fails checkpoint 3 on our own bit-identity check, and a declared
  tolerance profile is used only for the reference that declares it, stated next to SPEC's value;
- the reference says how to get llama.cpp when it is not there.

With llama.cpp (in-process `llama_cpp`, or LLORCH_LLAMACPP_PYTHON=/path/to/venv/bin/python, e.g.
/work/llamacpp-venv/bin/python): `validate --references transformers,llamacpp` on SmolLM2 — 1-7 n/a for
llamacpp, 8 passing at the declared tolerance, the report's fields present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llorch_cpud.engine import load_engine
from llorch_cpud.validate import references, report, runner
from llorch_cpud.validate.bugs import inject
from llorch_cpud.validate.checkpoints import OurSide, run_checkpoints
from llorch_cpud.validate.references.base import NotAvailable, Reference, ReferenceUnavailable
from llorch_cpud.validate.references.llamacpp_ref import ENV, PIN, TOLERANCE_8

PROMPT = "Hello. How are you?"
DATA = Path(__file__).parent / "data" / "llamacpp"


# ---------------------------------------------------------------- the harness with a logits-only reference (no llama.cpp)


class LogitsOnly(Reference):
    """A reference with fixed answers (our clean engine's, optionally changed) and no block-0 tensors or cache.
    `logits`: over the prompt and its greedy continuation; capture() hands out the rows of the ids it is given."""

    name = "stub"
    unavailable_reason = "stub: logits only"

    def __init__(self, logits, greedy_ids, tolerances=None):
        self.logits, self.greedy_ids = logits, greedy_ids
        if tolerances is not None:
            self.tolerances = tolerances
            self.tolerance_reason = "stub tolerance (test)"

    def load(self, model_path, family, engine):
        pass

    def versions(self):
        return {"stub": "1"}

    def capture(self, prompt_ids):
        assert len(prompt_ids) <= len(self.logits)
        return {"logits": self.logits[: len(prompt_ids)].copy()}

    def cache(self, prompt_ids, next_token):
        raise NotAvailable("stub has no cache")

    def greedy(self, prompt_ids, n_tokens, eos_token_id):
        return list(self.greedy_ids)

    def argmax(self, logits):
        return int(np.argmax(logits))

    def softmax(self, logits, temperature):
        x = logits.astype(np.float64) / temperature
        e = np.exp(x - x.max())
        return e / e.sum()


@pytest.fixture(scope="module")
def clean(gpt2_small):
    engine, path = load_engine(str(gpt2_small))
    ids = engine.tokenizer.encode(PROMPT)
    ours = OurSide(engine, ids, 6)
    greedy = list(ours.greedy)
    return engine, path, ids, engine.prefill_logits(ids + greedy).copy(), greedy


def test_logits_only_reference_gives_na_at_1_to_7_and_passes(clean, monkeypatch):
    engine, path, ids, logits, greedy = clean
    stub = LogitsOnly(logits, greedy)
    monkeypatch.setattr(references, "make", lambda name: stub)
    rep = runner.validate(engine, path, "gpt2", PROMPT, ["stub"], n_tokens=6, log=lambda m: None)
    by = {r["id"]: r for r in rep["results"]}
    assert sorted(by) == list(range(1, 13))
    for i in range(1, 8):
        r = by[i]
        assert r["status"] == "n/a" and r["passed"] is True and r["max_abs_diff"] is None, r
        assert "stub" in r["note"] and ("logits only" in r["note"] or "no cache" in r["note"]), r
    assert "bit-identical" in by[3]["note"]  # our own cache check still ran
    for i in range(8, 13):
        assert by[i]["status"] == "pass", by[i]
    assert by[8]["tolerance"] == 1e-3  # no declared profile: SPEC's tolerance
    assert rep["passed"] is True
    assert rep["reference_notes"]["stub"]["unavailable_reason"] == "stub: logits only"
    text = report.table(rep)
    rows = {line.split()[0]: line for line in text.splitlines() if line[:2].strip().isdigit()}
    assert all(rows[str(i)].rstrip().endswith("N/A") for i in range(1, 8)), text
    assert "stub: N/A at checkpoints 1-7 (not compared, not a failure): stub: logits only" in text
    md = report.markdown(rep)
    assert "N/A at checkpoints 1-7" in md and "| n/a |" in md
    json.dumps(rep)  # machine-readable as it is


def test_broken_cache_still_fails_checkpoint_3_without_a_reference_cache(clean):
    """Our own bit-identity check runs even when the reference has no cache to compare: a cache bug is not n/a."""
    engine, path, ids, logits, greedy = clean
    with inject("kv_cache_off_by_one", engine.model):
        results = runner.check(engine, LogitsOnly(logits, greedy), ids, 6)  # at the prompt and at decode positions
    r3 = results[2]
    assert r3.id == 3 and r3.status in ("fail", "error") and not r3.passed, r3  # not hidden as n/a


def test_declared_tolerance_is_used_only_by_the_reference_that_declares_it(clean):
    engine, path, ids, logits, greedy = clean
    ours = OurSide(engine, ids, 6)
    off = logits.copy()
    off[:, 7] += 0.3  # far outside SPEC's 1e-3, inside a declared 0.5
    plain = {r.id: r for r in run_checkpoints(engine, ours, LogitsOnly(off, greedy), "gpt2")}
    assert plain[8].status == "fail" and plain[8].tolerance == 1e-3
    declared = {r.id: r for r in run_checkpoints(engine, ours, LogitsOnly(off, greedy, {8: 0.5}), "gpt2")}
    r8 = declared[8]
    assert r8.status == "pass" and r8.tolerance == 0.5 and r8.max_abs_diff == pytest.approx(0.3, abs=1e-5)
    assert "stub tolerance (test), SPEC 1e-3" in r8.note
    assert declared[9].passed and "checkpoint 8 tolerance 0.5" in declared[9].note
    assert declared[1].tolerance == 1e-5  # only the declared checkpoint changes


def test_greedy_paths_parting_is_a_tie_below_the_declared_tolerance_and_a_fail_above(clean):
    engine, path, ids, logits, greedy = clean
    ours = OurSide(engine, ids, 6)
    last = ours.full_logits[-1].astype(np.float64)
    second = int(np.argsort(-last, kind="stable")[1])
    gap = float(last[greedy[0]] - last[second])
    other = [second] + greedy[1:]  # the reference picks our second-best token at step 0
    tie = {r.id: r for r in run_checkpoints(engine, ours, LogitsOnly(logits, other, {8: gap + 1.0}), "gpt2")}[12]
    assert tie.status == "tie" and tie.passed
    assert tie.note.startswith("paths part at step 0") and f"our logit gap {gap:.3g}" in tie.note and "tie" in tie.note
    fail = {r.id: r for r in run_checkpoints(engine, ours, LogitsOnly(logits, other, {8: gap / 2}), "gpt2")}[12]
    assert fail.status == "fail" and not fail.passed and "fail: not below" in fail.note


def test_unavailable_says_how_to_get_it(monkeypatch, tmp_path):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama_cpp is importable here: the reference runs in-process")
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ReferenceUnavailable) as e:
        references.make("llamacpp")
    assert f"pip install llama-cpp-python=={PIN}" in str(e.value) and ENV in str(e.value)
    monkeypatch.setenv(ENV, str(tmp_path / "no-such-python"))
    with pytest.raises(ReferenceUnavailable, match="not an executable file"):
        references.make("llamacpp")


# ---------------------------------------------------------------- with llama.cpp


def llamacpp_or_skip() -> Reference:
    try:
        return references.make("llamacpp")
    except ReferenceUnavailable as e:
        pytest.skip(f"llama.cpp reference unavailable: {e}")  # the message says how to get it


def test_llamacpp_reproduces_its_recorded_outputs(smollm2_gguf):
    ref = llamacpp_or_skip()
    data = json.loads((DATA / "llamacpp_smollm2.json").read_text())
    ref.load(smollm2_gguf, "llama", None)
    try:
        p = data["prompts"][0]  # "Hello."
        logits = ref.capture(p["prompt_token_ids"])["logits"]
        assert logits.shape == (len(p["prompt_token_ids"]), data["header"]["n_vocab"])
        recorded = np.load(DATA / p["last_logits_file"])
        assert np.abs(logits[-1] - recorded).max() < 0.05  # same llama.cpp build here: 0.0
        assert ref.argmax(logits[-1]) == p["last_logits_argmax"]
        assert ref.greedy(p["prompt_token_ids"], 8, None) == p["greedy_token_ids"][:8]
        probs = ref.softmax(logits[-1], 1.0)
        assert abs(probs.sum() - 1.0) < 1e-5
        assert "gives our 2 ids exactly" in ref.tokenization(p["prompt"], p["prompt_token_ids"])
        with pytest.raises(NotAvailable):
            ref.cache(p["prompt_token_ids"], 198)
        v = ref.versions()
        assert v["llama-cpp-python"].startswith(PIN) and {"logits", "argmax", "softmax", "greedy", "runs"} <= set(v)
    finally:
        ref.close()


@pytest.fixture(scope="module")
def validated(smollm2_gguf, tmp_path_factory):
    llamacpp_or_skip()
    try:
        references.make("transformers")
    except ReferenceUnavailable as e:
        pytest.skip(f"transformers unavailable: {e}")
    out = tmp_path_factory.mktemp("rep_llamacpp")
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "validate", "--model", str(smollm2_gguf),
                        "--references", "transformers,llamacpp", "--tokens", "8", "--report", str(out)],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ))
    return r, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_validate_smollm2_against_transformers_and_llamacpp(validated):
    r, rep, md = validated
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rep["references"] == ["transformers", "llamacpp"] and rep["skipped"] == {} and rep["passed"] is True
    rows = {(x["reference"], x["id"]): x for x in rep["results"]}
    for i in range(1, 13):
        t, l = rows[("transformers", i)], rows[("llamacpp", i)]
        assert t["passed"] and t["status"] != "n/a", t  # transformers provides everything, at SPEC tolerances
        for row in (t, l):
            assert {"id", "name", "reference", "shape", "max_abs_diff", "tolerance", "passed", "status", "stats",
                    "note"} <= set(row)
    for i in range(1, 8):
        l = rows[("llamacpp", i)]
        assert l["status"] == "n/a" and l["passed"] and l["max_abs_diff"] is None and "llama" in l["note"], l
    l8 = rows[("llamacpp", 8)]
    assert l8["status"] == "pass" and l8["tolerance"] == TOLERANCE_8 and l8["max_abs_diff"] <= TOLERANCE_8
    assert "llama.cpp reference tolerance (8-bit activations), SPEC 1e-3" in l8["note"]
    assert rows[("transformers", 8)]["tolerance"] == 1e-3
    assert rows[("llamacpp", 9)]["passed"] and rows[("llamacpp", 10)]["status"] in ("pass", "tie")
    assert rows[("llamacpp", 11)]["status"] == "pass"
    l12 = rows[("llamacpp", 12)]
    assert l12["status"] in ("pass", "tie"), l12
    if l12["status"] == "tie":
        assert "paths part at step" in l12["note"] and "our logit gap" in l12["note"]
    notes = rep["reference_notes"]["llamacpp"]
    assert notes["tolerances"] == {"8": TOLERANCE_8} and "8-bit" in notes["tolerance_reason"]
    assert "gives our 2 ids exactly" in notes["tokenization"]
    assert "transformers" not in rep["reference_notes"]  # nothing declared, nothing to note
    assert rep["versions"]["llamacpp/llama-cpp-python"].startswith(PIN)
    assert "N/A at checkpoints 1-7" in r.stdout and f"(tol {TOLERANCE_8:g})" in r.stdout and "tokenization" in r.stdout
    assert "| n/a |" in md and "N/A at checkpoints 1-7" in md
