"""Time whole `generate` commands as a user would: `llorch-cpud generate` against transformers'
`from_pretrained` + `generate` on the same GPT-2 folder, each a fresh process, alternating, several rounds.

    python scripts/time_generate.py /path/to/gpt2-folder [--max-tokens 128] [--rounds 5] [--prompt TEXT]

Both are greedy (transformers' default for GPT-2, `--temperature 0` for ours). transformers is held to
exactly --max-tokens tokens (min_new_tokens); ours stops early at EOS, so each side's token count is
printed and a short run is visible. Prints, per round, the wall-clock seconds of each whole command and
each side's own decode rate, then the medians and the ratios transformers/ours (wall) and
ours/transformers (decode tok/s). Needs torch and transformers (the test dependencies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HF_SCRIPT = r"""
import sys, time, json
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(prompt, return_tensors="pt").input_ids
t = time.perf_counter()
out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
dt = time.perf_counter() - t
print(json.dumps({"tokens": int(out.shape[1] - ids.shape[1]), "generate_s": dt}))
"""


def run(cmd: list[str]) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{cmd[:3]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return wall, json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", default="The history of the city begins with")
    a = p.parse_args(argv)
    ours_cmd = [sys.executable, "-m", "llorch_cpud.cli", "generate", "--model", a.model, "--max-tokens",
                str(a.max_tokens), "--temperature", "0", "--json", a.prompt]
    hf_cmd = [sys.executable, "-c", HF_SCRIPT, a.model, a.prompt, str(a.max_tokens)]
    rows = []
    for i in range(a.rounds):
        ow, o = run(ours_cmd)
        hw, h = run(hf_cmd)
        ours_tps, hf_tps = o["decode_tokens_per_sec"], h["tokens"] / h["generate_s"]
        rows.append((ow, hw, ours_tps, hf_tps))
        print(f"round {i + 1}: ours {ow:.3f} s ({len(o['token_ids'])} tokens, decode {ours_tps:.1f} tok/s) | "
              f"transformers {hw:.3f} s ({h['tokens']} tokens, generate {hf_tps:.1f} tok/s)", flush=True)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(f"median wall: ours {med(0):.2f} s, transformers {med(1):.2f} s -> {statistics.median(r[1] / r[0] for r in rows):.2f}x")
    print(f"median decode: ours {med(2):.1f} tok/s, transformers {med(3):.1f} tok/s -> "
          f"{statistics.median(r[2] / r[3] for r in rows):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
