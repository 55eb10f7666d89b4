"""`llorch-cpud validate`: our engine against each named reference, checkpoint by checkpoint."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy

from llorch_cpud import __version__
from llorch_cpud.engine import Engine
from llorch_cpud.errors import LlorchError
from llorch_cpud.validate import references
from llorch_cpud.validate.checkpoints import CHECKPOINTS, NUMERICS_TOLERANCES, DecodeSide, OurSide, run_checkpoints
from llorch_cpud.validate.decode import forced_tokens, run_path
from llorch_cpud.validate.references.base import ReferenceUnavailable


def parse_references(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise LlorchError("--references: give at least one reference")
    unknown = [n for n in names if n not in references.known()]
    if unknown:
        raise LlorchError(f"--references: unknown reference {unknown[0]!r} (known: {', '.join(references.known())})")
    return names


def weights_note(path: Path) -> str:
    """Say plainly when the weights are our synthetic fixture: a pass on them is not a pass on real weights."""
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is not None and cfg.is_file():
        fixture = json.loads(cfg.read_text()).get("llorch_fixture")
        if fixture:
            return f"SYNTHETIC seeded random weights (llorch fixture {fixture}); passing here does not prove real weights"
    return f"as loaded from {path} (real or user-provided weights)"


def base_versions() -> dict[str, str]:
    v = {"llorch-cpud": __version__, "python": sys.version.split()[0], "numpy": numpy.__version__,
         "platform": platform.platform()}
    try:
        cfg = numpy.show_config(mode="dicts")
        v["blas"] = f"{cfg['Build Dependencies']['blas']['name']} {cfg['Build Dependencies']['blas'].get('version', '')}".strip()
    except Exception:
        pass
    return v


def reference_notes(ref, prompt: str, prompt_ids: list[int]) -> dict:
    """What a reference declares about itself: a tolerance profile that replaces SPEC's (with its reason), and
    how its own tokenizer encodes the prompt text compared with our ids (every reference is fed our ids)."""
    out: dict = {}
    if getattr(ref, "tolerances", None):
        out["tolerances"] = {str(k): v for k, v in sorted(ref.tolerances.items())}
        out["tolerance_reason"] = getattr(ref, "tolerance_reason", "")
        out["spec_tolerances"] = {str(k): CHECKPOINTS[k][1] for k in sorted(ref.tolerances) if k in CHECKPOINTS}
    if getattr(ref, "unavailable_reason", ""):
        out["unavailable_reason"] = ref.unavailable_reason
    try:
        tok = ref.tokenization(prompt, prompt_ids)
    except Exception as e:
        tok = f"could not compare its tokenization: {type(e).__name__}: {e}"
    if tok:
        out["tokenization"] = tok
    return out


def decode_side(engines: list[Engine], ref, prompt_ids: list[int], theirs: list[int], n_tokens: int,
                cache: dict | None = None) -> DecodeSide:
    """Our teacher-forced decode runs on each engine's path (validate/decode.py), fed the reference's greedy tokens
    `theirs`, and the reference's forward over them. `cache`: runs already made, by forced tokens (references that
    agree share them)."""
    cache = {} if cache is None else cache
    forced = forced_tokens(theirs, prompt_ids, n_tokens, engines[0].eos_token_id)
    if tuple(forced) not in cache:
        cache[tuple(forced)] = [run_path(e, prompt_ids, forced) for e in engines]
    return DecodeSide(prompt_ids, forced, cache[tuple(forced)], ref.capture(prompt_ids + forced))


def check(engine: Engine, ref, prompt_ids: list[int], n_tokens: int, path_engines: list[Engine] | None = None) -> list:
    """Every checkpoint of `engine` against one loaded reference on one prompt, at decode positions too (on each of
    `path_engines`' paths; default: the engine's own): the Results, one per checkpoint."""
    ours = OurSide(engine, prompt_ids, n_tokens)
    theirs = ref.greedy(prompt_ids, n_tokens, engine.eos_token_id)
    decode = decode_side(path_engines or [engine], ref, prompt_ids, theirs, n_tokens)
    return run_checkpoints(engine, ours, ref, engine.model.family, decode, theirs)


def validate(engine: Engine, model_path: Path, family: str, prompt: str, ref_names: list[str], n_tokens: int = 64,
             log=print, path_engines: list[Engine] | None = None) -> dict:
    """Run every checkpoint against every reference; returns the report dict. `path_engines`: the engines whose
    decode paths are checked at decode positions (validate/decode.py; default: `engine` alone); `n_tokens`: the
    greedy tokens compared end to end, and the decode steps teacher-forced on each path."""
    prompt_ids = engine.tokenizer.encode(prompt)
    if not prompt_ids:
        raise LlorchError("--prompt: encodes to no tokens")
    room = engine.model.n_ctx - len(prompt_ids) - 1
    if room < 1:
        raise LlorchError(f"--prompt: {len(prompt_ids)} tokens leave no room in the model's context {engine.model.n_ctx}")
    if n_tokens > room:
        log(f"--tokens {n_tokens} cut to {room}: the model's context is {engine.model.n_ctx}")
        n_tokens = room
    path_engines = path_engines or [engine]
    log(f"our side: {len(prompt_ids)} prompt tokens, {n_tokens} greedy tokens")
    ours = OurSide(engine, prompt_ids, n_tokens)
    decode_cache: dict = {}
    results, skipped, versions, notes = [], {}, base_versions(), {}
    for name in ref_names:
        log(f"reference {name}: loading")
        try:
            ref = references.make(name)
            ref.load(model_path, family, engine)
        except ReferenceUnavailable as e:
            skipped[name] = str(e)
            log(f"reference {name}: SKIPPED ({e})")
            continue
        versions.update({f"{name}/{k}": v for k, v in ref.versions().items()})
        notes[name] = reference_notes(ref, prompt, prompt_ids)
        log(f"reference {name}: greedy tokens, our decode steps on them, its forward over them")
        theirs = ref.greedy(prompt_ids, n_tokens, engine.eos_token_id)
        decode = decode_side(path_engines, ref, prompt_ids, theirs, n_tokens, decode_cache)
        log(f"reference {name}: running checkpoints")
        results += [r.to_json() for r in run_checkpoints(engine, ours, ref, family, decode, theirs)]
        del ref
    ran = [n for n in ref_names if n not in skipped]
    return {
        "model": str(model_path),
        "family": family,
        "numerics": engine.model.numerics,
        "numerics_tolerances": {str(k): v for k, v in NUMERICS_TOLERANCES.get(engine.model.numerics, {}).items()},
        "weights": weights_note(model_path),
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "n_tokens": n_tokens,
        "paths": [e.model.path for e in path_engines],
        "references": ran,
        "skipped": skipped,
        "versions": versions,
        "reference_notes": {n: v for n, v in notes.items() if v},
        "results": results,
        "passed": bool(ran) and not skipped and all(r["passed"] for r in results),
    }
