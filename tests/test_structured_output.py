"""Structured output (structured.py): JSON Schemas and grammars enforced by llguidance's token mask.

Engine level, on the 2-layer GPT-2 fixture with random weights: unconstrained, it almost never writes JSON (the
negative control below), so every output that parses and validates is the mask's doing. 9 schemas (nested
objects, enums, arrays with min/max items, bounded numbers and integers, booleans, required and optional
properties, strings with maxLength and pattern, arrays of objects, anyOf/const) x 21 seeds at temperature 1.0 (207 generations with the greedy ones),
plus greedy runs (twice each: bit-identical), all batched through `Engine.step`; then one server-level test
through the `openai` client, and the 400s.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from llorch_cpud.errors import InvalidRequest
from llorch_cpud.sampling import SamplingParams, make_rng, sample

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

FIGURES: dict = {}
SEEDS = range(21)
MAX_TOKENS = 64
PROMPT = "Reply in JSON:"

SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {
            "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                       "required": ["name", "age"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["person", "active"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"], "additionalProperties": False,
    },
    "array_min_max": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                      "minItems": 2, "maxItems": 4},
    "bounded_numbers": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99},
                       "x": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
                       "neg": {"type": "integer", "exclusiveMaximum": 0, "minimum": -50}},
        "required": ["n", "x", "neg"], "additionalProperties": False,
    },
    "booleans": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 5},
    "required_optional": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                       "note": {"type": "string", "maxLength": 5},
                       "flag": {"type": "boolean"}},
        "required": ["id"], "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "short": {"type": "string", "maxLength": 4}},
        "required": ["code", "short"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 3}},
                  "required": ["k", "v"], "additionalProperties": False},
        "minItems": 1, "maxItems": 3,
    },
    "any_of_const": {"anyOf": [{"type": "null"}, {"const": "yes"}, {"type": "integer", "minimum": 0, "maximum": 5}]},
}


@pytest.fixture(scope="module")
def engine(gpt2_small):
    from llorch_cpud.engine import load_engine

    eng, _ = load_engine(str(gpt2_small))
    return eng


def run(engine, requests):
    """Generate every request in one batch (Engine.step over all of them): their EndEvents, in order."""
    seqs = [engine.start(r) for r in requests]
    while not all(s.done for s in seqs):
        engine.step(seqs)
    assert all(s.error is None for s in seqs), [s.error for s in seqs if s.error]
    return [s.end for s in seqs]


def request(grammar, seed, temperature=1.0, **kw):
    from llorch_cpud.engine import Request

    return Request(prompt=PROMPT, max_tokens=MAX_TOKENS, seed=seed, grammar=grammar,
                   sampling=SamplingParams(temperature=temperature), **kw)


def parses(text) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_parses_and_validates(engine, name):
    schema = SCHEMAS[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    grammar = engine.constraints.compile("json_schema", schema)
    t0 = time.perf_counter()
    sampled = run(engine, [request(grammar, seed) for seed in SEEDS])
    greedy = run(engine, [request(grammar, seed, temperature=0.0) for seed in (0, 1)])
    FIGURES.setdefault("seconds_per_schema", {})[name] = round(time.perf_counter() - t0, 2)
    FIGURES["generations"] = FIGURES.get("generations", 0) + len(sampled) + len(greedy)
    for end in sampled + greedy:
        assert end.stop_reason == "eos", (name, end.stop_reason, end.text)  # the grammar completed: no truncation
        assert engine.eos_token_id not in end.token_ids
        value = json.loads(end.text)
        jsonschema.validate(value, schema)
    # Greedy under a schema is deterministic (and the seed does not matter to it).
    assert greedy[0].token_ids == greedy[1].token_ids
    # Random weights sample a variety of valid documents, not one.
    if name not in ("booleans", "any_of_const"):
        assert len({e.text for e in sampled}) > 3, [e.text for e in sampled]


def test_negative_control_without_the_constraint_output_is_not_json(engine):
    """The same requests unconstrained: the random-weight model writes JSON for (almost) no seed."""
    ends = run(engine, [request(None, seed) for seed in SEEDS])
    valid = sum(parses(e.text) for e in ends)
    FIGURES["unconstrained_valid_json"] = f"{valid}/{len(ends)}"
    assert valid <= len(ends) // 4, [e.text for e in ends]


def test_json_object_starts_an_object_and_parses_when_complete(engine):
    """`json_object` (any JSON object) has unbounded strings: random weights rarely close one within the budget, so
    outputs cut by max_tokens are only checked to be an object's start; completed ones parse as objects."""
    grammar = engine.constraints.compile("json_object", None)
    ends = run(engine, [request(grammar, seed) for seed in range(8)])
    for end in ends:
        assert end.text.startswith("{"), end.text
        if end.stop_reason == "eos":
            assert isinstance(json.loads(end.text), dict)
        else:
            assert end.stop_reason == "max_tokens"


def test_lark_grammar(engine):
    grammar = engine.constraints.compile("grammar", 'start: ("yes" | "no") " " NUM\nNUM: /[0-9]{1,3}/')
    for end in run(engine, [request(grammar, seed) for seed in range(10)]):
        assert end.stop_reason == "eos"
        word, num = end.text.split(" ")
        assert word in ("yes", "no") and num.isdigit() and 1 <= len(num) <= 3, end.text


def test_greedy_with_a_grammar_takes_full_logits_not_the_head_screen(engine, monkeypatch):
    def screen(*a, **kw):
        raise AssertionError("a constrained sequence took the greedy head screen")

    grammar = engine.constraints.compile("json_schema", SCHEMAS["enums"])
    monkeypatch.setattr(engine.model, "greedy_tokens", screen)
    (end,) = run(engine, [request(grammar, 0, temperature=0.0)])
    jsonschema.validate(json.loads(end.text), SCHEMAS["enums"])


def test_logprobs_with_a_grammar_report_the_models_distribution(engine):
    grammar = engine.constraints.compile("json_schema", SCHEMAS["enums"])
    (end,) = run(engine, [request(grammar, 3, logprobs=2)])
    assert len(end.token_logprobs) == len(end.token_ids)
    assert all(np.isfinite(e.logprob) for e in end.token_logprobs)


@pytest.mark.parametrize("kind,spec,words", [
    ("json_schema", {"type": "array", "uniqueItems": True}, "uniqueItems"),
    ("json_schema", {"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ("json_schema", {"type": "strnig"}, "strnig"),
    ("json_schema", {"$ref": "#/definitions/missing"}, "missing"),
    ("json_schema", [1, 2], "JSON object"),
    ("grammar", "start: undefined_rule", "undefined_rule"),
])
def test_unsupported_constraints_are_invalid_requests_saying_what(engine, kind, spec, words):
    with pytest.raises(InvalidRequest) as e:
        engine.constraints.compile(kind, spec)
    message = str(e.value)
    assert words in message and "\n" not in message, message


def test_mask_cost_per_token_reported(engine):
    """The per-token mask cost on GPT-2's 50257-token vocabulary (reported, not asserted)."""
    grammar = engine.constraints.compile("json_schema", SCHEMAS["nested_object"])
    m = engine.constraints.matcher(grammar)
    rng = np.random.default_rng(0)
    times = []
    while not m.done and len(times) < 200:
        t0 = time.perf_counter()
        allowed = m.allowed()
        times.append(time.perf_counter() - t0)
        ids = np.flatnonzero(allowed)
        ids = ids[ids != engine.eos_token_id]
        m.consume(int(rng.choice(ids)))
    FIGURES["mask_ms_per_token_gpt2"] = {"median": round(float(np.median(times)) * 1e3, 4),
                                         "max": round(float(np.max(times)) * 1e3, 3), "steps": len(times)}


def test_real_smollm2_gguf_follows_schemas(smollm2_gguf):
    """The same adapter on a GGUF file's tokenizer (SmolLM2-135M-Instruct, 49152 tokens), with real weights."""
    from llorch_cpud.engine import Request, load_engine
    from llorch_cpud.tokenizer.chat import apply_chat_template

    eng, _ = load_engine(str(smollm2_gguf))
    prompt = apply_chat_template(eng.tokenizer, [{"role": "user", "content": "Describe a person as JSON."}])
    for name in ("nested_object", "enums", "array_of_objects"):
        grammar = eng.constraints.compile("json_schema", SCHEMAS[name])
        reqs = [Request(prompt=prompt, max_tokens=MAX_TOKENS, seed=seed, grammar=grammar,
                        sampling=SamplingParams(temperature=t)) for seed, t in ((0, 0.0), (1, 1.0), (2, 1.0))]
        for end in run(eng, reqs):
            assert end.stop_reason == "eos", (name, end.text)
            jsonschema.validate(json.loads(end.text), SCHEMAS[name])
        FIGURES.setdefault("smollm2_examples", {})[name] = end.text


# ---------------------------------------------------------------------------- no model: the sampler's mask


def test_sample_never_picks_a_disallowed_token():
    rng = make_rng(7)
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 5
    allowed = np.zeros(1000, bool)
    allowed[[3, 500, 999]] = True
    for params in (SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=50),
                   SamplingParams(top_p=0.5), SamplingParams(min_p=0.2), SamplingParams(repetition_penalty=1.3)):
        picks = {sample(logits, params, rng, history=[3, 4], allowed=allowed) for _ in range(50)}
        assert picks <= {3, 500, 999}, (params, picks)
    best = int(np.argmax(np.where(allowed, logits, -np.inf)))
    assert sample(logits, SamplingParams(temperature=0.0), rng, allowed=allowed) == best
    with pytest.raises(ValueError, match="allows no token"):
        sample(logits, SamplingParams(), rng, allowed=np.zeros(1000, bool))


# ---------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def worker(gpt2_small, tmp_path_factory):
    from test_server import running, with_template

    d = with_template(gpt2_small, tmp_path_factory.mktemp("so") / "gpt2-small-chat")
    with running(d, tmp_path_factory.mktemp("so-logs")) as w:
        yield w


@pytest.mark.slow
def test_server_response_format_through_the_openai_client(worker):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=worker.base + "/v1", api_key="none", timeout=120)
    schema = SCHEMAS["nested_object"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    for seed in range(4):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Who?"}],
                                           response_format=fmt, seed=seed, max_tokens=MAX_TOKENS)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    greedy = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Who?"}],
                                             response_format=fmt, temperature=0, max_tokens=MAX_TOKENS)
              .choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, seed=1,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "e", "schema": SCHEMAS["enums"]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["enums"])
    # Streaming: the chunks concatenate to the same valid document.
    chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Who?"}],
                                            response_format=fmt, seed=2, max_tokens=MAX_TOKENS, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow
def test_server_unsupported_or_malformed_response_format_is_400(worker):
    import httpx

    msgs = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}},
         "uniqueItems"),
        ({"type": "xml"}, "type"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "u", "schema": "not a schema"}}, "schema"),
    ]
    for fmt, words in cases:
        r = httpx.post(worker.base + "/v1/chat/completions", json={"messages": msgs, "response_format": fmt}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and words in err["message"], err
    # /execute: json_schema (valid: a stream of tokens that parses; unsupported: 400 naming the field)
    r = httpx.post(worker.base + "/execute", json={"job_id": "s1", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                   "seed": 1, "json_schema": SCHEMAS["enums"]}, timeout=60)
    assert r.status_code == 200
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    text = "".join(json.loads(d).get("t", "") for d in events[1:-2])
    jsonschema.validate(json.loads(text), SCHEMAS["enums"])
    assert json.loads(events[-1])["stop_reason"] == "eos"
    r = httpx.post(worker.base + "/execute", json={"job_id": "s2", "prompt": PROMPT, "max_tokens": 8,
                                                   "json_schema": {"type": "array", "uniqueItems": True}}, timeout=60)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "json_schema", r.text
    r = httpx.post(worker.base + "/execute", json={"job_id": "s3", "prompt": PROMPT, "max_tokens": 8,
                                                   "grammar": 'start: "a" | "b"'}, timeout=60)
    assert r.status_code == 200 and '"stop_reason": "eos"' in r.text.replace('":"', '": "'), r.text
