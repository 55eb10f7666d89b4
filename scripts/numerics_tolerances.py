"""Measure how far each of our numerics modes lands from the references, over 20 prompts, per checkpoint.

The declared tolerances come from these figures: the q8 profile in llorch_cpud/validate/checkpoints.py
(NUMERICS_TOLERANCES) and llama.cpp's checkpoint-8 tolerance in validate/references/llamacpp_ref.py.
Writes tests/data/numerics_tolerances.json (the largest difference seen per mode, reference and checkpoint,
with the median over prompts for checkpoint 8).

    LLORCH_LLAMACPP_PYTHON=/path/to/venv-with-llama-cpp/bin/python python scripts/numerics_tolerances.py [--model M]

Without llama.cpp available the llamacpp column is left out (and the file says so).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from llorch_cpud.engine import load_engine
from llorch_cpud.validate.runner import validate

WORDS = ("time people year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact").split()
PROMPTS = ["Hello.", "The quick brown fox jumps over the lazy dog because",
           "Quelle est la capitale de la France ? Réponds en une phrase.", "1, 1, 2, 3, 5, 8, 13,",
           "<|im_start|>user\nWrite a haiku about CPUs.<|im_end|>\n<|im_start|>assistant\n",
           "def f(x):\n    return x * 2\n\nprint(f(3))", "Once upon a time, in a land far away, there lived a",
           "SELECT name, age FROM users WHERE", "日本の首都は", "The mitochondria is the powerhouse of the cell. It produces"]
_rng = np.random.default_rng(0)
PROMPTS += [" ".join(_rng.choice(WORDS, size=int(_rng.integers(3, 60)))) for _ in range(10)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests/data/numerics_tolerances.json")
    a = ap.parse_args()
    out = {"model": a.model or "default (SmolLM2-135M-Instruct Q4_1)", "prompts": len(PROMPTS), "modes": {}}
    for numerics in ("float32", "q8"):
        engine, path = load_engine(a.model, numerics=numerics)
        worst: dict = {}
        full: dict = {}
        skipped = {}
        for p in PROMPTS:
            r = validate(engine, path, engine.model.family, p, ["transformers", "llamacpp"], n_tokens=8, log=lambda m: None)
            skipped.update(r["skipped"])
            for x in r["results"]:
                d = x["max_abs_diff"]
                if d is None or isinstance(d, str):
                    continue
                key = f"{x['reference']}/{x['id']}"
                worst[key] = max(worst.get(key, 0.0), d)
                if x["id"] == 8:
                    full.setdefault(x["reference"], []).append(d)
            print(numerics, repr(p[:40]), {k: f"{v:.3g}" for k, v in sorted(worst.items())}, flush=True)
        out["modes"][numerics] = {"max_abs_diff": worst,
                                  "checkpoint_8_median": {k: statistics.median(v) for k, v in full.items()},
                                  "skipped": skipped}
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
