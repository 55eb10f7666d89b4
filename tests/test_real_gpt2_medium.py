"""SPEC §2's known end-to-end facts for the real GPT-2 Medium weights (greedy, 10 new tokens).

Real weights cannot be downloaded on these machines: the test runs when LLORCH_GPT2_MEDIUM
names a folder holding openai-community/gpt2-medium (config.json, model.safetensors,
tokenizer files), and is skipped with that reason otherwise.
"""

import os
from pathlib import Path

import pytest

from llorch_cpud.engine import Engine, Request
from llorch_cpud.formats import load_model
from llorch_cpud.sampling import SamplingParams

FOLDER = os.environ.get("LLORCH_GPT2_MEDIUM")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not FOLDER, reason="set LLORCH_GPT2_MEDIUM to a folder with the real gpt2-medium weights to run this"
)]

FACTS = [
    ("Hello.", "Hello. I'm a little late to the party, but"),
    ("What is the answer to life, the universe, and everything?",
     "What is the answer to life, the universe, and everything?\n\nThe answer is that we are all one"),
]


@pytest.fixture(scope="module")
def engine():
    model, tok, _ = load_model(str(Path(FOLDER)))
    assert model.config.n_layer == 24 and model.config.n_embd == 1024
    return Engine(model, tok)


@pytest.mark.parametrize("prompt,expected", FACTS)
def test_greedy_10_tokens(engine, prompt, expected):
    *_, end = engine.generate(Request(prompt=prompt, max_tokens=10, sampling=SamplingParams(temperature=0.0)))
    assert len(end.token_ids) == 10
    assert prompt + end.text == expected


def test_hello_prompt_ids(engine):
    assert engine.tokenizer.encode("Hello.") == [15496, 13]
