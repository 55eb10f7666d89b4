"""`llorch-cpud validate --isolated`: the seed's experiment with no model file.

The seed's LayerNorm input and table, then QKV, attention, FFN and the block on deterministic
synthetic weights, against every installed reference; ours must be bit-exact across two runs. The
run is computed once for the module (in-process) and once through the CLI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import _references_harness  # noqa: F401  (tinygrad's kernel cache into a temporary folder)
from _references_harness import installed
from llorch_cpud.validate import isolated
from llorch_cpud.validate.bugs import inject

pytestmark = pytest.mark.slow  # the references

ALL = ["transformers", "candle", "tinygrad", "jax"]


@pytest.fixture(scope="module")
def report():
    return isolated.run_isolated(log=lambda msg: None)


def test_seed_input_is_the_seeds_formula():
    x = isolated.seed_input(2)
    assert x.shape == (2, 1024) and x.dtype == np.float32
    assert x[1, 3] == np.float32(math.sin((1 * 1024 + 3) * 0.001) * 0.5)
    assert isolated.wave((3, 4), 1, 1.0).tolist() == isolated.wave((3, 4), 1, 1.0).tolist()  # no RNG
    w = isolated.wave((64, 64), 5, 1.0)
    assert np.linalg.matrix_rank(w.astype(np.float64)) == 64  # full rank, unlike sin(a·i + b·j)


def test_every_installed_reference_ran(report):
    ok, missing = installed(ALL)
    if "transformers" not in ok:
        pytest.skip(f"torch/transformers missing: {missing}")
    assert report["references"] == ok
    assert set(report["skipped"]) == set(missing)
    for name, reason in missing.items():
        print(f"skipped {name}: {reason}")


def test_all_components_pass_and_ours_is_bit_exact(report):
    assert report["references"], report["skipped"]
    assert [c["id"] for c in report["components"]] == [1, 2, 4, 5, 6, 7]
    assert all(c["deterministic"] for c in report["components"])
    bad = [r for r in report["results"] if not r["passed"]]
    assert not bad, bad
    assert len(report["results"]) == 6 * len(report["references"])
    for r in report["results"]:
        assert {"id", "name", "reference", "shape", "max_abs_diff", "tolerance", "passed", "stats"} <= set(r)
    assert report["passed"] is True


def test_layernorm_is_the_seeds_numbers(report):
    ln = report["components"][0]
    assert ln["name"] == "LayerNorm" and ln["shape"] == [2, 1024] and ln["tolerance"] == 1e-5
    ours_first = ln["ours"]["first"][0]
    assert abs(ours_first - (-1.85958872)) < 2e-7  # numpy float64 gives -1.85958872; the seed's ours -1.8595886
    assert abs(ln["ours"]["mean"]) < 1e-6 and abs(ln["ours"]["std"] - 0.9936) < 1e-3  # the seed: mean 0, std 0.993602
    by = {r["reference"]: r for r in report["results"] if r["id"] == 1}
    if "candle" in by:  # the record: Candle's Python bindings give -1.85958862 in float32
        assert f"{by['candle']['stats']['reference']['first'][0]:.8f}" == "-1.85958862"
    for name in ("jax", "tinygrad"):  # float64 references: the exact value
        if name in by:
            assert f"{by[name]['stats']['reference']['first'][0]:.8f}" == "-1.85958872"
    for r in by.values():
        assert r["max_abs_diff"] <= 1e-5


def test_table_has_the_seeds_rows_and_one_column_per_reference(report):
    text = isolated.table(report)
    for row in ("first[0]", "mean", "std", "min", "max", "max abs diff", "tolerance", "result", "bit-exact x2"):
        assert row in text
    header = next(line for line in text.splitlines() if "llorch-cpud" in line)
    for name in report["references"]:
        assert report["labels"][name] in header
    assert "-1.85958862" in text


def test_an_injected_bug_fails_its_component():
    """The isolated run calls the engine's own stage functions: a wrong-epsilon LayerNorm fails there."""
    class Model:  # inject() patches the gpt2 module; the model is only needed for weight bugs
        family = "gpt2"
        weights: dict = {}

    with inject("wrong_epsilon", Model()):
        rep = isolated.run_isolated(references=["candle"] if "candle" in installed(["candle"])[0] else ["jax"],
                                    log=lambda msg: None)
    if not rep["references"]:
        pytest.skip(f"no framework reference installed: {rep['skipped']}")
    failed = {r["id"] for r in rep["results"] if not r["passed"]}
    assert 1 in failed and rep["passed"] is False


def test_cli_isolated(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "validate", "--isolated", "--report", str(tmp_path / "rep")],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== 1. LayerNorm" in r.stdout and "PASS" in r.stdout and "bit-exact x2" in r.stdout
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["mode"] == "isolated" and rep["passed"] is True
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "LayerNorm" in md and "| first[0] |" in md


def test_cli_isolated_writes_no_report_unless_asked(tmp_path, monkeypatch, capsys):
    from llorch_cpud.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--isolated"]) == 0
    out = capsys.readouterr().out
    assert "== 7. block output" in out and out.rstrip().splitlines()[-1].startswith("PASS")
    assert list(tmp_path.iterdir()) == []
