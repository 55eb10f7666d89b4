"""llorch_cpud.logprobs (no model: the fast tier) and the engine's log-probabilities (the GPT-2 fixture)."""

from __future__ import annotations

import numpy as np
import pytest

from llorch_cpud.logprobs import TokenTexts, completion_logprobs, entries, log_softmax, top_k


def test_log_softmax_float64_of_float32():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 1000)) * 30).astype(np.float32)
    lp = log_softmax(x)
    assert lp.dtype == np.float64
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-12)
    z = x.astype(np.float64)
    np.testing.assert_allclose(lp, z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
                               - z.max(-1, keepdims=True), atol=1e-12)
    big = np.array([[1e30, 0.0, -1e30]], dtype=np.float32)  # no overflow, no NaN
    assert np.isfinite(log_softmax(big)[0, :2]).all()


def test_top_k_sorted_ties_lower_id_first():
    lp = np.log(np.array([0.1, 0.3, 0.3, 0.2, 0.1]))
    assert [i for i, _ in top_k(lp, 3)] == [1, 2, 3]
    assert [i for i, _ in top_k(lp, 5)] == [1, 2, 3, 0, 4]
    assert top_k(lp, 0) == []
    got = entries(np.log(np.array([[0.5, 0.25, 0.25]], dtype=np.float32)), [2], 2)[0]
    assert got.token_id == 2 and abs(got.logprob - np.log(0.25)) < 1e-7 and [t for t, _ in got.top] == [0, 1]


@pytest.fixture(scope="module")
def gpt2_tok():
    from llorch_cpud.errors import ModelLoadError
    from llorch_cpud.tokenizer import Tokenizer, byte_level_bpe, gpt2_tokenizer_files, read_merges

    try:
        vocab_path, merges_path = gpt2_tokenizer_files()
    except ModelLoadError as e:
        pytest.skip(str(e))
    import json

    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    return Tokenizer(inner=byte_level_bpe(vocab, read_merges(merges_path), ["<|endoftext|>"]), eos_token_id=50256)


def test_token_texts_bytes_and_partial_characters(gpt2_tok):
    texts = TokenTexts(gpt2_tok)
    assert texts.byte_level
    text = "Hello café 龘!"
    ids = gpt2_tok.encode(text)
    assert b"".join(texts.bytes(i) for i in ids) == text.encode("utf-8")
    shown = [texts.text(i) for i in ids]
    partial = [s for s in shown if s.startswith("bytes:")]
    assert partial, shown  # 龘's 3 bytes are split across two tokens
    assert all(s.startswith("bytes:\\x") for s in partial)
    offs = texts.offsets(ids)
    assert offs[0] == 0 and offs == sorted(offs) and offs[-1] == len(text) - 1  # "!" is the last character
    assert offs[-3] == offs[-2] == len("Hello café ")  # both halves of 龘 start at its character
    out = completion_logprobs(texts, [None] + [None] * (len(ids) - 1), ids)
    assert out["tokens"] == shown and out["text_offset"] == offs
    assert texts.text(50256) == "<|endoftext|>"


def test_engine_prompt_logprobs_chunked_equal_unchunked(gpt2_small):
    """Echo's prompt log-probabilities are the same however the prompt is chunked, and max_tokens 0 scores the
    prompt without generating."""
    from llorch_cpud.engine import Request, load_engine
    from llorch_cpud.sampling import SamplingParams

    eng, _ = load_engine(str(gpt2_small))
    ids = eng.tokenizer.encode("One two three four five six seven eight nine ten eleven twelve")

    def run(chunk, max_tokens):
        seq = eng.start(Request(prompt_ids=ids, max_tokens=max_tokens, sampling=SamplingParams(temperature=0),
                                logprobs=2, prompt_logprobs=True, seed=0))
        while not seq.done:
            seq.chunk = chunk
            eng.step([seq])
        return seq.end

    whole, chunked, zero = run(None, 4), run(3, 4), run(5, 0)
    assert whole.prompt_logprobs[0] is None and len(whole.prompt_logprobs) == len(ids)
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= 1e-5
    assert zero.token_ids == [] and zero.stop_reason == "max_tokens" and len(zero.prompt_logprobs) == len(ids)
    assert whole.token_ids == chunked.token_ids
    assert [e.token_id for e in whole.token_logprobs] == whole.token_ids
    assert all(e.top[0][0] == e.token_id for e in whole.token_logprobs)  # greedy: the chosen token is the top-1
    with pytest.raises(Exception, match="max_tokens"):
        eng.start(Request(prompt_ids=ids, max_tokens=0))  # 0 only when the prompt is scored
