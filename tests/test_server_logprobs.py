"""Log-probabilities and echo through a real `llorch-cpud serve` on loopback, against transformers.

The server runs the 2-layer GPT-2 fixture (plus a chat template) with `--prefill-tokens 3`, so every prompt
is prefilled in chunks of 3 and echo's prompt log-probabilities come from several steps. The reference is
transformers' GPT2LMHeadModel on the same folder: log_softmax (float64) of its logits, compared at SPEC
checkpoint 8's tolerance (1e-3, full logits). The comparison is shown able to fail: log-probabilities read
one position off, or after temperature, miss the reference by far more than the tolerance.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from test_server import Worker, sse, with_template

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-3  # SPEC checkpoint 8 (full logits)
PROMPT = "The capital of France is Paris, and the capital of Germany is"


@pytest.fixture(scope="module")
def model_dir(gpt2_small, tmp_path_factory):
    return with_template(gpt2_small, tmp_path_factory.mktemp("lp") / "gpt2-small-chat")


@pytest.fixture(scope="module")
def worker(model_dir, tmp_path_factory):
    w = Worker(model_dir, tmp_path_factory.mktemp("lp-logs"), "--prefill-tokens", "3").start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def ref(model_dir):
    """ids -> [len(ids), vocab] float64 log-probabilities from transformers (row i predicts token i + 1)."""
    m = transformers.GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()

    def run(ids):
        with torch.no_grad():
            logits = m(torch.tensor([list(ids)])).logits[0]
        return torch.log_softmax(logits.double(), dim=-1).numpy()

    return run


@pytest.fixture(scope="module")
def tok(model_dir):
    from llorch_cpud.formats import load_tokenizer

    return load_tokenizer(str(model_dir))


def post(w, path, body, status=200):
    r = httpx.post(w.base + path, json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def execute(w, body):
    """/execute's events as (event, data) pairs."""
    with httpx.Client(timeout=120) as c, c.stream("POST", w.base + "/execute", json=body) as r:
        assert r.status_code == 200, r.read()
        return [(ev, json.loads(data)) for ev, data in sse(r)]


def stream_chunks(w, path, body):
    with httpx.Client(timeout=120) as c, c.stream("POST", w.base + path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        out = []
        for _, data in sse(r):
            if data == "[DONE]":
                break
            out.append(json.loads(data))
        return out


def gen_ids(w, prompt, n, **extra):
    """Greedy ids of `prompt` (with their /execute log-probability entries)."""
    evs = execute(w, {"job_id": f"ids-{abs(hash((prompt, n, str(extra))))}", "prompt": prompt, "max_tokens": n,
                      "temperature": 0, "logprobs": 5, **extra})
    entries = [e for ev, d in evs if ev == "token" for e in d["logprobs"]] + \
        [e for ev, d in evs if ev == "end" for e in d["logprobs"]]
    return [e["id"] for e in entries], entries


def max_diff(got: list[float], ids: list[int], lp: np.ndarray, first_row: int, shift: int = 0) -> float:
    """Largest |got[i] - lp[first_row + i + shift, ids[i]]| (shift != 0: the off-by-one negative control)."""
    return max(abs(g - lp[first_row + i + shift, t]) for i, (g, t) in enumerate(zip(got, ids)))


# ---------------------------------------------------------------------------- /execute


def test_execute_logprobs_match_transformers(worker, ref, tok):
    prompt_ids = tok.encode(PROMPT)
    ids, entries = gen_ids(worker, PROMPT, 10)
    assert len(ids) == 10
    lp = ref(prompt_ids + ids[:-1])
    first = len(prompt_ids) - 1  # the row that predicts the first generated token
    assert max_diff([e["logprob"] for e in entries], ids, lp, first) <= TOL
    for i, e in enumerate(entries):
        top = e["top_logprobs"]
        assert len(top) == 5
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["id"] == e["id"] and top[0]["logprob"] == e["logprob"]  # greedy: the chosen one is the top-1
        row = lp[first + i]
        assert max(abs(t["logprob"] - row[t["id"]]) for t in top) <= TOL
        ref_top = np.sort(row)[::-1][:5]
        assert np.abs(np.array([t["logprob"] for t in top]) - ref_top).max() <= TOL
        assert e["token"] == tok.decode([e["id"]])
    # Negative control: the same comparison one position off fails by far more than the tolerance.
    assert max_diff([e["logprob"] for e in entries][1:], ids[1:], lp, first + 1, shift=-1) > 10 * TOL


def test_execute_without_logprobs_has_none(worker):
    evs = execute(worker, {"job_id": "plain", "prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert all("logprobs" not in d for ev, d in evs if ev in ("token", "end"))


def test_sampled_logprobs_are_the_models_distribution(worker, ref, tok):
    """With temperature, top-k and a repetition penalty, the reported numbers are still the model's own
    distribution (before them): they match transformers' plain log-softmax, not the tempered one."""
    prompt_ids = tok.encode(PROMPT)
    ids, entries = gen_ids(worker, PROMPT, 8, temperature=0.5, top_k=50, repetition_penalty=1.3, seed=7)
    lp = ref(prompt_ids + ids[:-1])
    got = [e["logprob"] for e in entries]
    first = len(prompt_ids) - 1
    assert max_diff(got, ids, lp, first) <= TOL
    # Negative control: log-probabilities taken after temperature 0.5 miss the reference.
    tempered = np.log(np.exp(lp / 0.5) / np.exp(lp / 0.5).sum(-1, keepdims=True))
    assert max_diff(got, ids, tempered, first) > 10 * TOL


# ---------------------------------------------------------------------------- /v1/completions


def test_completions_echo_logprobs_match_transformers(worker, ref, tok):
    prompt_ids = tok.encode(PROMPT)
    n = len(prompt_ids)
    out = post(worker, "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 3, "max_tokens": 6,
                                           "temperature": 0})
    ch = out["choices"][0]
    lpr = ch["logprobs"]
    assert ch["text"].startswith(PROMPT)
    assert len(lpr["tokens"]) == len(lpr["token_logprobs"]) == len(lpr["top_logprobs"]) == len(lpr["text_offset"]) == n + 6
    assert lpr["token_logprobs"][0] is None and lpr["top_logprobs"][0] is None  # the first prompt token: no context
    assert "".join(lpr["tokens"]) == ch["text"]  # ASCII: every token is whole text
    assert lpr["text_offset"] == [len("".join(lpr["tokens"][:i])) for i in range(n + 6)]
    gen = tok.encode(ch["text"][len(PROMPT):])
    ids = prompt_ids + gen
    assert len(gen) == 6 and tok.decode(ids) == ch["text"]
    lp = ref(ids[:-1])
    got = lpr["token_logprobs"][1:]
    assert max_diff(got, ids[1:], lp, 0) <= TOL  # every prompt token but the first, and every generated one
    for i, top in enumerate(lpr["top_logprobs"][1:]):
        assert len(top) == 3
        vals = list(top.values())
        assert vals == sorted(vals, reverse=True)
        assert np.abs(np.array(vals) - np.sort(lp[i])[::-1][:3]).max() <= TOL
    for i in range(n, n + 6):  # greedy: each generated token's log-probability is its position's top-1
        assert lpr["token_logprobs"][i] == max(lpr["top_logprobs"][i].values())
    # Negative control: prompt log-probabilities read one position off fail.
    assert max_diff(got[1:], ids[2:], lp, 1, shift=-1) > 10 * TOL


def test_lm_eval_loglikelihood_payload(worker, ref, tok):
    """Exactly what lm-evaluation-harness's local-completions sends for a loglikelihood request (token ids in a
    list of one, echo, logprobs 1, max_tokens 1), and max_tokens 0 (the prompt scored, nothing generated)."""
    ids = tok.encode("Question: what is two plus two? Answer: four")
    body = {"model": "m", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    out = post(worker, "/v1/completions", body)
    lpr = out["choices"][0]["logprobs"]
    assert len(lpr["token_logprobs"]) == len(ids) + 1
    lp = ref(ids)
    assert max_diff(lpr["token_logprobs"][1 : len(ids)], ids[1:], lp, 0) <= TOL
    zero = post(worker, "/v1/completions", {**body, "max_tokens": 0})
    ch = zero["choices"][0]
    assert ch["text"] == tok.decode(ids) and ch["finish_reason"] == "length"
    assert zero["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert ch["logprobs"]["token_logprobs"] == lpr["token_logprobs"][: len(ids)]
    assert ch["logprobs"]["top_logprobs"] == lpr["top_logprobs"][: len(ids)]
    lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
    ctxlen = 8  # what lm-eval does with the answer: sum the continuation's log-probabilities
    (ll, greedy), = lm_eval.LocalCompletionsAPI.parse_logprobs(out, ctxlens=[ctxlen])
    assert abs(ll - sum(lp[i - 1, ids[i]] for i in range(ctxlen, len(ids)))) <= TOL * (len(ids) - ctxlen)
    assert isinstance(greedy, bool)


def test_echo_without_logprobs_and_stream_equals_nonstream(worker):
    plain = post(worker, "/v1/completions", {"prompt": PROMPT, "echo": True, "max_tokens": 4, "temperature": 0})
    assert plain["choices"][0]["text"].startswith(PROMPT) and plain["choices"][0]["logprobs"] is None
    body = {"prompt": PROMPT, "echo": True, "logprobs": 4, "max_tokens": 7, "temperature": 0}
    whole = post(worker, "/v1/completions", body)["choices"][0]
    chunks = stream_chunks(worker, "/v1/completions", body)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    merged = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for c in chunks:
        if c["choices"][0]["logprobs"] is not None:
            for k in merged:
                merged[k] += c["choices"][0]["logprobs"][k]
    assert text == whole["text"]
    assert merged == whole["logprobs"]  # the very same numbers, streamed or not


def test_stop_sequence_tokens_keep_their_entries(worker):
    base = {"prompt": PROMPT, "logprobs": 2, "max_tokens": 8, "temperature": 0}
    full = post(worker, "/v1/completions", base)["choices"][0]
    stop = full["logprobs"]["tokens"][3]
    cut = post(worker, "/v1/completions", {**base, "stop": [stop]})["choices"][0]
    assert cut["finish_reason"] == "stop" and not cut["text"].endswith(stop)
    assert cut["logprobs"]["token_logprobs"] == full["logprobs"]["token_logprobs"][: len(cut["logprobs"]["tokens"])]
    streamed = stream_chunks(worker, "/v1/completions", {**base, "stop": [stop]})
    n = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in streamed if c["choices"][0]["logprobs"])
    assert n == len(cut["logprobs"]["tokens"])


# ---------------------------------------------------------------------------- /v1/chat/completions


def test_chat_logprobs_equal_completions_on_the_templated_prompt(worker, tok):
    msgs = [{"role": "user", "content": "Name a city."}]
    body = {"messages": msgs, "logprobs": True, "top_logprobs": 4, "max_tokens": 6, "temperature": 0}
    chat = post(worker, "/v1/chat/completions", body)["choices"][0]
    content = chat["logprobs"]["content"]
    assert len(content) == 6
    from llorch_cpud.tokenizer.chat import apply_chat_template

    templated = apply_chat_template(tok, msgs)
    comp = post(worker, "/v1/completions", {"prompt": templated, "logprobs": 4, "max_tokens": 6,
                                            "temperature": 0})["choices"][0]["logprobs"]
    assert [e["logprob"] for e in content] == comp["token_logprobs"]
    assert [e["token"] for e in content] == comp["tokens"]
    for e, top in zip(content, comp["top_logprobs"]):
        assert {t["token"]: t["logprob"] for t in e["top_logprobs"]} == top
        assert len(e["top_logprobs"]) == 4 and e["top_logprobs"][0]["logprob"] == e["logprob"]
        assert bytes(e["bytes"]).decode() == e["token"]
    streamed = stream_chunks(worker, "/v1/chat/completions", body)
    merged = [e for c in streamed for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert merged == content
    no_top = post(worker, "/v1/chat/completions", {**body, "top_logprobs": None})["choices"][0]["logprobs"]["content"]
    assert all(e["top_logprobs"] == [] for e in no_top)


def test_openai_client_parses(worker):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=worker.base + "/v1", api_key="unused")
    r = client.completions.create(model="m", prompt=PROMPT, echo=True, logprobs=2, max_tokens=3, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    c = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       top_logprobs=2, max_tokens=3, temperature=0)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 and e.bytes for e in content)
    s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       top_logprobs=2, max_tokens=3, temperature=0, stream=True)
    streamed = [e for ch in s for choice in ch.choices if choice.logprobs and choice.logprobs.content
                for e in choice.logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": "3"}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
    ("/execute", {"job_id": "v", "prompt": "x", "max_tokens": 1, "logprobs": 21}, "logprobs"),
])
def test_out_of_range_is_400_naming_the_field(worker, path, body, field):
    r = httpx.post(worker.base + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    fields = [e["field"] for e in r.json()["errors"]]
    assert field in fields
