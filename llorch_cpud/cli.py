"""The `llorch-cpud` command: generate, validate, serve, bench (SPEC §6), info.

Bad input ends with one line `error: <reason>` on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

from llorch_cpud.arguments import add_numerics_argument, ranged
from llorch_cpud.errors import LlorchError

# The subcommands import what they run (engine, formats, validate: numpy and the C kernels) inside their
# functions, so that `--help` and argument errors answer without loading them.
# Modules that define a subcommand with `register(subparsers)`; the parser they add sets `func`.
# They must not import heavy dependencies at module level.
PLUGIN_COMMANDS = [m for m in ("llorch_cpud.server.cli", "llorch_cpud.bench") if importlib.util.find_spec(m)]

EXIT_FAILED_VALIDATION = 1
EXIT_BAD_INPUT = 2


SAMPLING_EPILOG = (
    "Sampling options left out take the model's own recommendation where its files carry one (a Hugging Face "
    "folder's generation_config.json, as transformers reads it: do_sample false is greedy; a GGUF file's "
    "general.sampling.* keys), otherwise llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, "
    "repetition penalty 1.0. The embedded SmolLM2 carries none, so it gets llama.cpp's; --json reports the "
    "sampling used and its source. Given options always win.")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> Parser:
    p = Parser(prog="llorch-cpud", description="CPU inference worker that proves its own numerics")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    model_help = "Hugging Face folder, .gguf file or hub name (default: embedded SmolLM2-135M-Instruct)"

    g = sub.add_parser("generate", help="generate a continuation and stream it to stdout", epilog=SAMPLING_EPILOG)
    g.add_argument("--model", default=None, help=model_help)
    g.add_argument("--max-tokens", type=ranged(int, 1, 2048, "--max-tokens"), default=32)
    g.add_argument("--temperature", type=ranged(float, 0.0, 2.0, "--temperature"), default=None,
                   help="0 (below 1e-6) is greedy")
    g.add_argument("--top-k", type=ranged(int, 0, None, "--top-k"), default=None, help="0 = off")
    g.add_argument("--top-p", type=ranged(float, 0.0, 1.0, "--top-p"), default=None, help="1 = off")
    g.add_argument("--min-p", type=ranged(float, 0.0, 1.0, "--min-p"), default=None, help="0 = off")
    g.add_argument("--repetition-penalty", type=ranged(float, 0.0, 2.0, "--repetition-penalty"), default=None,
                   help="1 = off")
    g.add_argument("--seed", type=ranged(int, 0, 2**64 - 1, "--seed"), default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable, at most 4)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object when done")
    add_numerics_argument(g)
    g.add_argument("prompt")

    v = sub.add_parser("validate", help="compare every checkpoint against reference implementations")
    v.add_argument("--model", default=None, help=model_help)
    v.add_argument("--prompt", default="Hello.")
    v.add_argument("--references", default="transformers", help="comma-separated, e.g. transformers,candle,tinygrad,jax,llamacpp")
    v.add_argument("--tokens", type=ranged(int, 1, 512, "--tokens"), default=64,
                   help="greedy tokens compared end to end (checkpoint 12), and decode steps teacher-forced on the "
                        "reference's tokens through every path (checkpoints 1-10 at decode positions)")
    v.add_argument("--paths", default=None, help="decode paths to check, comma-separated from fused,stages,numpy "
                   "(default: every one this build has)")
    v.add_argument("--report", type=Path, default=None, help="folder for report.json and report.md (default llorch-report; "
                   "with --isolated, reports are written only when given)")
    add_numerics_argument(v)
    v.add_argument("--isolated", action="store_true",
                   help="no model: each component alone on synthetic inputs against every installed reference")
    i = sub.add_parser("info", help="which kernels this install runs: the C build's instruction sets, the CPU's, the "
                                    "decode path models load with, and why it may be slower than it could be")
    i.add_argument("--json", action="store_true", help="one JSON object")
    g.set_defaults(func=cmd_generate)
    v.set_defaults(func=cmd_validate)
    i.set_defaults(func=cmd_info)
    for module in PLUGIN_COMMANDS:  # serve, bench: each module adds its own subcommand
        importlib.import_module(module).register(sub)
    return p


def chat_prompt(engine, text: str) -> str:
    from llorch_cpud.tokenizer.chat import apply_chat_template

    return apply_chat_template(engine.tokenizer, [{"role": "user", "content": text}])


def cmd_generate(a) -> int:
    from dataclasses import asdict

    from llorch_cpud.engine import EndEvent, ErrorEvent, Request, load_engine

    from llorch_cpud import kernels

    # why this run is slower than it could be, in one line (no C kernels, or not the best variant for this CPU)
    why = [w for w in kernels.info()["warnings"] if "LLORCH_KERNELS=numpy" not in w]
    if why:
        print(f"warning: {why[0]} (llorch-cpud info)", file=sys.stderr)
    engine, _ = load_engine(a.model, numerics=a.numerics)
    sampling = engine.sampling_defaults.params(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                               min_p=a.min_p, repetition_penalty=a.repetition_penalty)
    prompt = chat_prompt(engine, a.prompt) if a.chat else a.prompt
    req = Request(
        prompt=prompt,
        max_tokens=a.max_tokens,
        sampling=sampling,
        seed=a.seed,
        stop=a.stop,
    )
    end = None
    for ev in engine.generate(req):
        if isinstance(ev, EndEvent):
            end = ev
        elif isinstance(ev, ErrorEvent):
            raise LlorchError(f"generation failed ({ev.code}): {ev.message}")
        elif not a.json:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    if a.json:
        print(json.dumps({"prompt_ids": end.prompt_ids, "token_ids": end.token_ids, "text": end.text,
                          "stop_reason": end.stop_reason, "seed": end.seed,
                          "stop_sequence_matched": end.stop_sequence_matched,
                          "sampling": {**asdict(sampling), "defaults_source": engine.sampling_defaults.source},
                          "decode_tokens_per_sec": round(end.decode_tokens_per_sec, 2)}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def path_engines(engine, spec, numerics: str, paths: str | None) -> list:
    """One engine per decode path `validate` checks (models.base.PATHS): the production engine's own, the others
    built from it (stages: the same weights) or loaded again (numpy: float32 arrays, as without the extension)."""
    from llorch_cpud.engine import Engine, load_engine
    from llorch_cpud.kernels import enabled
    from llorch_cpud.models.base import PATHS

    if paths is None:
        names = list(PATHS) if enabled() and engine.model.path != "numpy" else ["numpy"]
        if numerics != "float32":
            names = [p for p in names if p != "numpy"]  # the numpy path has no quantized products to run in q8
    else:
        names = [p.strip() for p in paths.split(",") if p.strip()]
        bad = [p for p in names if p not in PATHS]
        if bad or not names:
            raise LlorchError(f"--paths: unknown path {bad[0]!r} (known: {', '.join(PATHS)})" if bad
                              else "--paths: give at least one path")
    out = []
    for p in names:
        if p == engine.model.path:
            out.append(engine)
        elif p == "numpy":
            out.append(load_engine(spec, numerics=numerics, tokenizer=engine.tokenizer, decode_path="numpy")[0])
        else:
            try:
                out.append(Engine(engine.model.with_path(p), engine.tokenizer, name=engine.name))
            except ValueError as e:
                raise LlorchError(f"--paths: {e}") from None
    return out


def cmd_validate(a) -> int:
    if a.isolated:
        from llorch_cpud.validate import isolated

        return isolated.main(a.report)
    from llorch_cpud.engine import load_engine
    from llorch_cpud.validate import report as rep
    from llorch_cpud.validate.runner import parse_references, validate

    refs = parse_references(a.references)
    a.report = a.report or Path("llorch-report")
    t0 = time.perf_counter()
    engine, path = load_engine(a.model, numerics=a.numerics)
    engines = path_engines(engine, a.model, a.numerics, a.paths)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = validate(engine, path, engine.model.family, a.prompt, refs, n_tokens=a.tokens, log=log,
                      path_engines=engines)
    j, m = rep.write(result, a.report)
    print(rep.comparison(result))
    print(rep.table(result))
    for name, reason in result["skipped"].items():
        print(f"skipped {name}: {reason}")
    print(f"weights: {result['weights']}; numerics: {result['numerics']}")
    print(f"{'PASS' if result['passed'] else 'FAIL'} in {time.perf_counter() - t0:.1f}s; reports: {j} {m}")
    return 0 if result["passed"] else EXIT_FAILED_VALIDATION


def cmd_info(a) -> int:
    from llorch_cpud import __version__, kernels
    from llorch_cpud.models.base import PATH_NAMES

    info = {"llorch-cpud": __version__, **kernels.info()}
    info["decode_path"] = "fused" if info["enabled"] else "numpy"  # what choose_path(None) gives a loaded model
    if a.json:
        print(json.dumps(info))
        return 0
    print(f"llorch-cpud {__version__}")
    print(f"cpu: {info['cpu']} ({' '.join(info['cpu_isa']) or 'flags unknown'})")
    if info["built"]:
        print(f"kernels: C, variant {info['tier']} ({' '.join(info['build_isa']) or 'no SIMD extension'}), "
              f"OpenMP {info['openmp'] or 'off'}{'' if info['enabled'] else ' - disabled by LLORCH_KERNELS=numpy'}")
    else:
        print("kernels: numpy only (no C kernel variant loaded)")
    print(f"kernel variants built: {', '.join(info['variants_built']) or 'none'}; this CPU's best: {info['cpu_tier']}")
    print(f"decode path: {info['decode_path']} ({PATH_NAMES[info['decode_path']]})")
    for w in info["warnings"]:
        print(f"warning: {w}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LlorchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
