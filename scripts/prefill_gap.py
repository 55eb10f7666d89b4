"""A running stream's gap between tokens while a long prompt is prefilled in chunks (Sequence.chunk, as the
worker's scheduler does with --prefill-tokens), in-engine on the default model:

    python scripts/prefill_gap.py CHUNK PROMPT_TOKENS

Prints the stream's usual gap (median of 10 decode steps alone), its gap while the prompt (random token ids)
is prefilled beside it (median and max), the prefill rate, and the process's peak RSS before and after."""

import resource
import sys
import time

import numpy as np

from llorch_cpud.cli import load_engine
from llorch_cpud.engine import Request
from llorch_cpud.sampling import SamplingParams

chunk, n_long = int(sys.argv[1]), int(sys.argv[2])
eng, _ = load_engine(None)
greedy = SamplingParams(temperature=0.0)
stream = eng.start(Request(prompt="Once upon a time", max_tokens=2000, sampling=greedy))
eng.step([stream])
gaps = []
for _ in range(10):
    t = time.perf_counter()
    eng.step([stream])
    gaps.append(time.perf_counter() - t)
usual = float(np.median(gaps))
ids = np.random.default_rng(0).integers(100, eng.model.vocab_size, n_long).tolist()
long = eng.start(Request(prompt_ids=ids, max_tokens=1, sampling=greedy))
long.chunk = chunk
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mixed, t0 = [], time.perf_counter()
while not long.generated:
    t = time.perf_counter()
    eng.step([stream, long])
    mixed.append(time.perf_counter() - t)
total = time.perf_counter() - t0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"chunk {chunk}, prompt {n_long}: usual gap {usual * 1e3:.1f} ms; while prefilling median "
      f"{np.median(mixed) * 1e3:.1f} ms, max {max(mixed) * 1e3:.1f} ms ({max(mixed) / usual:.1f}x); prefill "
      f"{n_long / total:.0f} tok/s; peak RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MB")
