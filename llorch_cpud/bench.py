"""`llorch-cpud bench`: our engine and its peers, side by side, in one run.

Every measurement runs in a fresh subprocess (so peak RSS is that runner's own), runners
alternate (ours, peer, ours, peer, ...) so that drift of a shared machine hits both, and the
table reports medians with min–max and the ratio ours/peer.

Runners:
  ours          this package's engine (numpy)
  transformers  PyTorch + transformers `generate` (greedy, KV cache); decode = (T(n) - T(1)) / (n - 1)
  llamacpp      llama-cpp-python on a .gguf file (needs a python that imports llama_cpp:
                --llamacpp-python, or $LLORCH_LLAMACPP_PYTHON)
Concurrency above 1 runs through the real servers (ours: `llorch-cpud serve`; peer:
llama-server, --llama-server PATH or $LLORCH_LLAMA_SERVER) with streaming clients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llorch_cpud.arguments import add_numerics_argument, ranged
from llorch_cpud.bench_server import bench_concurrency, progress_bar
from llorch_cpud.errors import LlorchError
from llorch_cpud.formats import resolve

RUNNERS = ("ours", "transformers", "llamacpp")
SEED_TEXT = (
    "The history of computing is a story of ideas that took decades to mature. Early machines filled rooms, "
    "consumed enormous power and were programmed by rewiring panels. "
)


# ---------------------------------------------------------------- runners (run in a subprocess)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prompt_ids_for(tokenizer_encode, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer_encode(SEED_TEXT)
    return ids[:n]


def run_ours(model: str | None, prompt_tokens: int, new_tokens: int, numerics: str = "float32") -> dict:
    from llorch_cpud.engine import Request, load_engine  # numpy and the kernels: not at CLI start-up
    from llorch_cpud.sampling import SamplingParams

    t0 = time.perf_counter()
    engine, _ = load_engine(model, numerics=numerics)
    load_s = time.perf_counter() - t0
    engine.eos_token_id = None  # generate exactly new_tokens
    ids = prompt_ids_for(engine.tokenizer.encode, prompt_tokens)
    greedy = SamplingParams(temperature=0.0)
    for ev in engine.generate(Request(prompt_ids=ids[:8], max_tokens=4, sampling=greedy)):  # warm-up
        pass
    seq = engine.start(Request(prompt_ids=ids, max_tokens=new_tokens, sampling=greedy, seed=0))
    t = time.perf_counter()
    engine.step([seq])  # prefill + first token
    t_first = time.perf_counter()
    while not seq.done:
        engine.step([seq])
    t_end = time.perf_counter()
    return {"prefill_tok_s": prompt_tokens / (t_first - t), "ttft_ms": (t_first - t) * 1000,
            "decode_tok_s": (new_tokens - 1) / (t_end - t_first), "load_s": load_s, "peak_rss_mb": peak_rss_mb()}


def load_tokenizer_only(path: Path):
    """Our tokenizer without our weights (so a peer's RSS is its own)."""
    from llorch_cpud.tokenizer import Tokenizer, load_hf_tokenizer

    if path.suffix != ".gguf":
        return load_hf_tokenizer(path)
    from llorch_cpud.formats.gguf import GGUFFile
    from llorch_cpud.tokenizer.gguf import load_gguf_tokenizer

    info = load_gguf_tokenizer(GGUFFile.open(path))
    return Tokenizer(inner=info.tokenizer, eos_token_id=info.eos_id, bos_token_id=info.bos_id, add_bos=info.add_bos)


def run_transformers(model: str | None, prompt_tokens: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve(model)
    t0 = time.perf_counter()
    if path.suffix == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.eval()
    load_s = time.perf_counter() - t0
    ids = prompt_ids_for(load_tokenizer_only(path).encode, prompt_tokens)  # the same prompt ids as ours
    def generate(prompt, n):  # transformers' own greedy decoding with its KV cache, exactly n new tokens
        x = torch.tensor([prompt])
        t = time.perf_counter()
        m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=0)
        return time.perf_counter() - t

    with torch.no_grad():
        generate(ids[:8], 4)  # warm-up
        t_one = generate(ids, 1)  # prefill + first token
        t_all = generate(ids, new_tokens)
    t, t_first, t_end = 0.0, t_one, t_all
    return {"prefill_tok_s": prompt_tokens / (t_first - t), "ttft_ms": (t_first - t) * 1000,
            "decode_tok_s": (new_tokens - 1) / (t_end - t_first), "load_s": load_s, "peak_rss_mb": peak_rss_mb()}


def run_llamacpp(model: str | None, prompt_tokens: int, new_tokens: int) -> dict:
    import llama_cpp
    import numpy as np

    path = Path(model) if model else None
    if path is None or path.suffix != ".gguf":
        raise SystemExit("llamacpp runner needs a .gguf --model")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_tokens + new_tokens + 16, n_threads=os.cpu_count() or 1,
                          n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids_for(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), prompt_tokens)

    n_vocab = llm.n_vocab()

    def last_logits():  # the last evaluated position's logits (Llama.scores holds them only with logits_all)
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    def greedy(prompt, n):
        llm.reset()
        llm.eval(prompt)
        t_first = time.perf_counter()
        nxt = int(np.argmax(last_logits()))
        for _ in range(n - 1):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits()))
        return t_first

    greedy(ids[:8], 4)
    t = time.perf_counter()
    t_first = greedy(ids, new_tokens)
    t_end = time.perf_counter()
    return {"prefill_tok_s": prompt_tokens / (t_first - t), "ttft_ms": (t_first - t) * 1000,
            "decode_tok_s": (new_tokens - 1) / (t_end - t_first), "load_s": load_s, "peak_rss_mb": peak_rss_mb(),
            "version": llama_cpp.__version__}


# ---------------------------------------------------------------- driver


def runner_python(name: str, args) -> str:
    if name == "llamacpp":
        py = args.llamacpp_python or os.environ.get("LLORCH_LLAMACPP_PYTHON")
        return py or sys.executable
    return sys.executable


def available(name: str, args) -> str | None:
    """None if the runner can run here, else the reason it cannot."""
    py = runner_python(name, args)
    module = {"ours": "numpy", "transformers": "transformers", "llamacpp": "llama_cpp"}[name]
    r = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"{py} cannot import {module}"
    if name == "llamacpp" and not str(args.model or "").endswith(".gguf") and args.model is not None:
        return "llamacpp needs a .gguf model"
    return None


def measure(name: str, args) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    model = str(resolve(args.model))
    cmd = [runner_python(name, args), "-m", "llorch_cpud.bench", "--runner", name, "--model", model,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    if name == "ours":
        cmd += ["--numerics", getattr(args, "numerics", "float32")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{name} runner failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(samples: list[dict]) -> dict:
    out = {}
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "load_s"):
        vals = [s[key] for s in samples if key in s]
        if vals:
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def ratio(result: dict, peer: str, key: str) -> float | None:
    """ours/peer for one metric: the median of the per-round ratios (the runners of a round ran back to
    back, so a change of the machine's memory bandwidth between rounds cancels out), falling back to the
    ratio of medians when per-round samples are missing."""
    ours, theirs = result.get("samples", {}).get("ours", []), result.get("samples", {}).get(peer, [])
    pairs = [a[key] / b[key] for a, b in zip(ours, theirs) if a.get(key) and b.get(key)]
    if pairs:
        return statistics.median(pairs)
    a, b = result["runners"]["ours"].get(key), result["runners"][peer].get(key)
    return a["median"] / b["median"] if a and b and b["median"] else None


def table(result: dict) -> str:
    names = list(result["runners"])
    rows = [["metric"] + names + [f"ours/{n}" for n in names if n != "ours"]]
    for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"), ("ttft_ms", "TTFT ms"),
                       ("peak_rss_mb", "peak RSS MB")):
        row = [label]
        for n in names:
            s = result["runners"][n].get(key)
            row.append(f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})" if s else "-")
        for n in names:
            if n == "ours":
                continue
            r = ratio(result, n, key)
            row.append(f"{r:.2f}x" if r else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def concurrency_table(conc: dict) -> str:
    """Streams through the real servers: one row per server and level (aggregate over the whole window,
    steady state with every stream decoding, per stream, TTFT, worst /health), then ours/peer."""
    rows = [["server", "streams", "aggregate tok/s", "steady tok/s", "per stream", "TTFT ms", "health max ms"]]
    servers = conc.get("servers", {})
    for name, s in servers.items():
        for level in conc.get("levels", []):
            r = s.get(str(level))
            if not isinstance(r, dict) or "aggregate_decode_tok_s" not in r:
                continue
            steady = r.get("steady_decode_tok_s")
            rows.append([name, str(level), f"{r['aggregate_decode_tok_s']:.1f} ({r['min']:.1f}-{r['max']:.1f})",
                         f"{steady:.1f}" if steady else "-", f"{r['per_stream_tok_s']:.1f}", f"{r['ttft_ms']:.0f}",
                         f"{r['health_ms_max']:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for name, s in servers.items():  # ratios: medians of per-round ratios (runs of a round are back to back)
        if s.get("scaling"):
            steady = f", steady state {s['steady_scaling']:.2f}x" if s.get("steady_scaling") else ""
            lines.append(f"{name}: {conc['levels'][-1]} streams / {conc['levels'][0]} = {s['scaling']:.2f}x aggregate{steady}")
    for key, by_level in servers.get("ours", {}).items():
        if key.startswith("vs_"):
            for level, ratio in by_level.items():
                if ratio:
                    lines.append(f"ours/{key[3:]} at {level} streams: {ratio:.2f}x aggregate")
    for name, reason in conc.get("skipped", {}).items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def bench(args) -> dict:
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in RUNNERS and p != "llama-server"]
    if unknown:
        raise LlorchError(f"--peers: unknown peer {unknown[0]!r} (known: transformers, llamacpp, llama-server)")
    names = ["ours"] + [p for p in peers if p in RUNNERS and p != "ours"]
    skipped = {}
    for n in list(names):
        reason = available(n, args)
        if reason:
            skipped[n] = reason
            names.remove(n)
    samples: dict[str, list] = {n: [] for n in names}
    total = args.repeats * len(names)
    done = 0
    for rep in range(args.repeats):
        for n in names:
            samples[n].append(measure(n, args))
            done += 1
            s = samples[n][-1]
            print(f"{progress_bar(done, total)} {n}: decode {s['decode_tok_s']:.1f} tok/s, "
                  f"prefill {s['prefill_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    result = {
        "model": str(args.model or "default"),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "numerics": getattr(args, "numerics", "float32"),
        "runners": {n: summarize(samples[n]) for n in names},
        "samples": samples,
        "skipped": skipped,
    }
    if "llama-server" in peers or any(c > 1 for c in args.concurrency):
        try:
            result["concurrency"] = bench_concurrency(args, "llama-server" in peers)
        except ImportError as e:
            result["skipped"]["concurrency"] = f"server benchmark unavailable: {e}"
    return result


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmark ours against peers in the same run")
    b.add_argument("--model", default=None)
    b.add_argument("--peers", default="transformers", help="comma-separated: transformers,llamacpp,llama-server")
    b.add_argument("--prompt-tokens", type=ranged(int, 1, 32768, "--prompt-tokens"), default=128)
    b.add_argument("--new-tokens", type=ranged(int, 2, 4096, "--new-tokens"), default=128)
    b.add_argument("--concurrency", default="1", help="comma-separated stream counts, e.g. 1,8")
    b.add_argument("--repeats", type=ranged(int, 1, 50, "--repeats"), default=3)
    b.add_argument("--json", type=Path, default=None, help="also write the result here")
    b.add_argument("--llamacpp-python", default=None, help="python interpreter that imports llama_cpp")
    b.add_argument("--llama-server", default=None, help="path to llama-server")
    add_numerics_argument(b)
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    try:
        args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    except ValueError:
        raise LlorchError(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}") from None
    result = bench(args)
    if result["numerics"] != "float32":
        print(f"ours runs with --numerics {result['numerics']}")
    print(table(result))
    for n, reason in result["skipped"].items():
        print(f"skipped {n}: {reason}")
    if "concurrency" in result:
        print()
        print(concurrency_table(result["concurrency"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _runner_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runner", choices=RUNNERS, required=True)
    p.add_argument("--model")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--numerics", default="float32")
    a = p.parse_args()
    if a.runner == "ours":
        print(json.dumps(run_ours(a.model, a.prompt_tokens, a.new_tokens, a.numerics)))
        return
    fn = {"transformers": run_transformers, "llamacpp": run_llamacpp}[a.runner]
    print(json.dumps(fn(a.model, a.prompt_tokens, a.new_tokens)))


if __name__ == "__main__":
    _runner_main()
