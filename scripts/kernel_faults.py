"""Negative controls inside the C kernels: build them with one injected fault and show that `validate` catches it.

    python scripts/kernel_faults.py FAULT --model M [--prompt P]... [--numerics q8] [--tokens 48] [--keep DIR]

FAULT is a name from llorch_cpud.validate.bugs.KERNEL_FAULTS (or NONE: the same build without a fault, the
control). The package is copied into a temporary folder (or DIR) and its kernels (kernels/c/, the best variant
this CPU runs) compiled there with -DLLORCH_FAULT=FAULT_<NAME>; the copy then runs `validate --references transformers` on each prompt, on the C
decode paths, and one JSON line per prompt is printed: {"prompt", "passed", "first_failure", "expected",
"failing_paths"}. The exit status is 0 when every prompt failed first at the expected checkpoint (for NONE:
when every prompt passed). The builds pip makes hold no fault code (FAULT(x) compiles to 0 without -DLLORCH_FAULT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import build_kernels

ROOT = Path(__file__).resolve().parents[1]


def build(fault: str, dest: Path) -> Path:
    """A copy of the package in dest whose C kernels carry `fault` (NONE: no fault); returns dest."""
    # -O1: a fault build compiles in a third of the time; it is compared with the reference, not with our build
    return build_kernels.build(dest, None, "-O1", fault)  # the best variant this CPU runs


def child(args) -> int:
    """Runs inside the faulty copy: validate on every prompt, one JSON line each."""
    from llorch_cpud.cli import path_engines
    from llorch_cpud.engine import load_engine
    from llorch_cpud.kernels import _qkernels
    from llorch_cpud.validate import references
    from llorch_cpud.validate.runner import validate

    assert Path(_qkernels.__file__).is_relative_to(Path.cwd()), "the faulty build is not the one imported"
    engine, path = load_engine(args.model, numerics=args.numerics)
    engines = path_engines(engine, args.model, args.numerics, "fused,stages")
    for prompt in args.prompt:
        report = validate(engine, path, engine.model.family, prompt, ["transformers"], n_tokens=args.tokens,
                          log=lambda *_: None, path_engines=engines)
        failed = [r for r in report["results"] if not r["passed"]]
        first = failed[0]["id"] if failed else None
        print(json.dumps({"prompt": prompt, "passed": report["passed"], "first_failure": first,
                          "failing_paths": [p["path"] for p in failed[0]["paths"] if p["status"] in ("fail", "error")]
                          if failed else []}), flush=True)
    del references
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fault")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", action="append", default=None)
    ap.add_argument("--numerics", default="float32")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--keep", type=Path, default=None, help="build into this folder and keep it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.prompt = args.prompt or ["The capital of France is", "Hello."]
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    from llorch_cpud.validate.bugs import KERNEL_FAULTS

    if args.fault != "NONE" and args.fault not in KERNEL_FAULTS:
        ap.error(f"unknown fault {args.fault!r} (known: NONE, {', '.join(KERNEL_FAULTS)})")
    expected = KERNEL_FAULTS[args.fault].expected if args.fault != "NONE" else None
    with tempfile.TemporaryDirectory(prefix=f"fault-{args.fault}-") as tmp:
        dest = build(args.fault, args.keep or Path(tmp))
        rows = run(dest, args.model, args.numerics, args.prompt, args.tokens)
    ok = True
    for row in rows:
        row = {**row, "fault": args.fault, "expected": expected}
        ok &= row["passed"] if expected is None else (not row["passed"] and row["first_failure"] == expected)
        print(json.dumps(row))
    return 0 if ok else 1


def run(dest: Path, model, numerics: str, prompts: list[str], tokens: int = 48) -> list[dict]:
    """validate, run by the package copy in dest (build) on each prompt: one dict per prompt (see `child`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "-", "--child", "--model", str(Path(model).resolve()),
           "--numerics", numerics, "--tokens", str(tokens)] + [x for p in prompts for x in ("--prompt", p)]
    r = subprocess.run(cmd, cwd=dest, env={**os.environ, "PYTHONPATH": str(dest)}, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"validate with the build in {dest} failed to run:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in r.stdout.splitlines()]


if __name__ == "__main__":
    sys.exit(main())
