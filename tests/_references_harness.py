"""Shared by tests/test_references_frameworks.py, test_references_cli.py and test_isolated.py: loading a
framework reference once per module (skipping with the framework's own reason when it cannot run here), memoising its
answers for the negative controls, and tinygrad's kernel cache in a temporary folder.

The reference side never depends on our engine (an injected bug changes only our side), so a
reference's capture / cache / greedy for given token ids are computed once and replayed: each
negative control then costs only our side's run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# tinygrad reads CACHEDB when it is first imported: point it into a temporary folder before that.
if "CACHEDB" not in os.environ:
    _tinygrad_cache = tempfile.mkdtemp(prefix="llorch-tinygrad-cache-")
    os.environ["CACHEDB"] = os.path.join(_tinygrad_cache, "cache.db")
    atexit.register(shutil.rmtree, _tinygrad_cache, True)

from llorch_cpud.engine import load_engine  # noqa: E402
from llorch_cpud.validate import references  # noqa: E402
from llorch_cpud.validate.bugs import inject  # noqa: E402
from llorch_cpud.validate.checkpoints import OurSide, run_checkpoints  # noqa: E402
from llorch_cpud.validate.runner import check  # noqa: E402
from llorch_cpud.validate.references.base import Reference, ReferenceUnavailable  # noqa: E402

PROMPT = "Hello. How are you?"


def make_or_skip(name: str) -> Reference:
    try:
        return references.make(name)
    except ReferenceUnavailable as e:
        pytest.skip(f"reference {name} unavailable here: {e}")


def installed(names) -> tuple[list[str], dict[str, str]]:
    """The references that can run here, and why the others cannot."""
    ok, missing = [], {}
    for n in names:
        try:
            references.make(n)
            ok.append(n)
        except ReferenceUnavailable as e:
            missing[n] = str(e)
    return ok, missing


class Memo(Reference):
    """A loaded reference whose answers are computed once per input and handed out as copies."""

    def __init__(self, ref: Reference):
        self.ref, self.name, self._seen = ref, ref.name, {}

    def _once(self, key, fn):
        if key not in self._seen:
            self._seen[key] = fn()
        return self._seen[key]

    def load(self, model_path, family, engine):  # pragma: no cover - loaded before wrapping
        raise NotImplementedError

    def versions(self):
        return self.ref.versions()

    def capture(self, prompt_ids):
        cap = self._once(("capture", tuple(prompt_ids)), lambda: self.ref.capture(prompt_ids))
        return {k: v.copy() for k, v in cap.items()}

    def cache(self, prompt_ids, next_token):
        return self._once(("cache", tuple(prompt_ids), next_token), lambda: self.ref.cache(prompt_ids, next_token))

    def greedy(self, prompt_ids, n_tokens, eos_token_id):
        return list(self._once(("greedy", tuple(prompt_ids), n_tokens, eos_token_id),
                               lambda: self.ref.greedy(prompt_ids, n_tokens, eos_token_id)))

    def argmax(self, logits):
        return self.ref.argmax(logits)

    def softmax(self, logits, temperature):
        return self.ref.softmax(logits, temperature)


def load_pair(name: str, model_path, family: str):
    """(engine, memoised reference) for one model; skips when the reference cannot run here."""
    ref = make_or_skip(name)
    engine, path = load_engine(str(model_path))
    try:
        ref.load(path, family, engine)
    except ReferenceUnavailable as e:
        pytest.skip(f"reference {name} cannot load {family}: {e}")
    return engine, Memo(ref)


def run(engine, ref, family: str, n_tokens: int = 6, prompt: str = PROMPT, decode: bool = True):
    """Every checkpoint, at the prompt and (decode=True) at decode positions: validate's own runner.check."""
    assert engine.model.family == family
    ids = engine.tokenizer.encode(prompt)
    results = check(engine, ref, ids, n_tokens) if decode else run_checkpoints(engine, OurSide(engine, ids, n_tokens),
                                                                               ref, family)
    return [r.id for r in results if not r.passed], results


def assert_bug_caught(engine, ref, family: str, bug: str, n_tokens: int = 6, decode: bool = True):
    with inject(bug, engine.model) as b:
        failed, results = run(engine, ref, family, n_tokens, decode=decode)
    assert failed, f"{ref.name}: {bug} went unnoticed"
    assert failed[0] == b.expected, (f"{ref.name}: {bug}: first failure {failed[0]}, expected {b.expected}: "
                                     f"{results[failed[0] - 1]}")


def assert_all_pass(results, family: str):
    bad = [r for r in results if not r.passed]
    assert not bad, bad
    assert [r.id for r in results] == list(range(1, 13))
    for r in results:
        if r.max_abs_diff is not None:
            assert r.max_abs_diff <= r.tolerance, r
    assert results[0].name == {"gpt2": "LayerNorm", "llama": "RMSNorm"}[family]


def assert_finite(a):
    assert np.isfinite(np.asarray(a)).all()
