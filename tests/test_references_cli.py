"""`llorch-cpud validate --references transformers,candle,tinygrad,jax` on the full-size GPT-2 fixture:
exit 0 with twelve passing checkpoints per reference, and the report with one column per reference
(the seed's comparison table: first value, mean, std, max abs diff, result) in the console,
report.md and report.json. References that cannot run here are left out, with their reason printed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import _references_harness  # noqa: F401  (tinygrad's kernel cache into a temporary folder)
from _references_harness import installed

ALL = ["transformers", "candle", "tinygrad", "jax"]


@pytest.fixture(scope="module")
def four(gpt2_full, tmp_path_factory):
    ok, missing = installed(ALL)
    for name, reason in missing.items():
        print(f"reference {name} left out: {reason}")
    if len(ok) < 2:
        pytest.skip(f"fewer than two references can run here: {missing}")
    out = tmp_path_factory.mktemp("rep4")
    r = subprocess.run([sys.executable, "-m", "llorch_cpud.cli", "validate", "--model", str(gpt2_full), "--references",
                        ",".join(ok), "--tokens", "8", "--report", str(out)], capture_output=True, text=True, timeout=900)
    return ok, r, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_exit_zero_and_twelve_passing_checkpoints_each(four):
    ok, r, report, _ = four
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["passed"] is True and report["references"] == ok and report["skipped"] == {}
    for name in ok:
        rows = [row for row in report["results"] if row["reference"] == name]
        assert [row["id"] for row in rows] == list(range(1, 13)), name
        assert all(row["passed"] for row in rows), [row for row in rows if not row["passed"]]
        for row in rows:
            assert {"id", "name", "reference", "shape", "max_abs_diff", "tolerance", "passed", "stats"} <= set(row)
            if isinstance(row["max_abs_diff"], float):
                assert row["max_abs_diff"] <= row["tolerance"]
    for name in ok:  # each reference says what it is
        assert any(k.startswith(f"{name}/") for k in report["versions"]), name


def test_console_and_markdown_have_one_column_per_reference(four):
    ok, r, report, md = four
    header = next(line for line in r.stdout.splitlines() if line.startswith("#   checkpoint"))
    for name in ok:
        assert name in header
    compare = next(line for line in r.stdout.splitlines() if "llorch-cpud" in line)
    assert all(name in compare for name in ok)
    for row in ("first value", "mean", "std", "max abs diff", "result"):
        assert row in r.stdout and f"| {row} |" in md
    assert "## Comparison, per checkpoint" in md and "### 1. LayerNorm" in md
    assert md.count("| llorch-cpud | " + " | ".join(ok) + " |") == 12
