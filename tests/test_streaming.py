"""The generation loop's text: UTF-8-complete pieces, stop strings withheld, EOS, limits."""

import numpy as np
import pytest

from llorch_cpud.engine import Engine, EndEvent, Request, TextStream, TokenEvent
from llorch_cpud.errors import ContextOverflow, InvalidRequest
from llorch_cpud.formats import load_model
from llorch_cpud.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(gpt2_small):
    model, tok, _ = load_model(str(gpt2_small))
    return Engine(model, tok)


def pieces_of(stream, ids):
    return [stream.push(i) for i in ids]


def test_split_character_is_held_until_complete(engine):
    tok = engine.tokenizer
    ids = tok.encode(" rocket 🚀 done")
    s = TextStream(tok, [])
    out = pieces_of(s, ids) + [s.finish()]
    assert "".join(out) == " rocket 🚀 done"
    assert all("\ufffd" not in p for p in out)
    assert any(p == "" for p in out)  # something was held while the emoji's bytes arrived


def test_stop_string_not_emitted_even_across_tokens(engine):
    tok = engine.tokenizer
    ids = tok.encode("alpha beta STOPHERE gamma")
    s = TextStream(tok, ["STOPHERE"])
    out = []
    for i in ids:
        out.append(s.push(i))
        if s.matched:
            break
    assert s.matched == "STOPHERE"
    assert "".join(out) == "alpha beta " and s.final_text == "alpha beta "


def test_stop_prefix_released_when_it_turns_out_not_to_be_a_stop(engine):
    tok = engine.tokenizer
    s = TextStream(tok, ["\n\n"])
    out = pieces_of(s, tok.encode("one\ntwo")) + [s.finish()]
    assert "".join(out) == "one\ntwo" and s.matched is None


def test_earliest_of_several_stop_strings_wins(engine):
    tok = engine.tokenizer
    s = TextStream(tok, ["world", "lo w"])
    for i in tok.encode("hello world"):
        s.push(i)
        if s.matched:
            break
    assert s.matched == "lo w" and s.final_text == "hel"


@pytest.mark.parametrize("seed", range(6))
def test_pieces_concatenate_to_decoded_generation(engine, seed):
    """High temperature on a random model produces many partial-byte tokens: pieces stay valid and complete."""
    events = list(engine.generate(Request(prompt="Hello.", max_tokens=40, seed=seed, sampling=SamplingParams(temperature=2.0))))
    end = events[-1]
    assert isinstance(end, EndEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    assert [e.index for e in events[:-1]] == list(range(len(events) - 1))
    assert "".join(e.text for e in events[:-1]) == end.text == engine.tokenizer.decode_generated(end.token_ids)
    assert len(end.token_ids) == 40 and end.stop_reason == "max_tokens"


def test_generation_stops_at_stop_string(engine):
    *_, free = engine.generate(Request(prompt="Hello.", max_tokens=20, sampling=SamplingParams(temperature=0.0)))
    word = free.text.split()[2]
    events = list(engine.generate(Request(prompt="Hello.", max_tokens=20, sampling=SamplingParams(temperature=0.0), stop=[word])))
    end = events[-1]
    assert end.stop_reason == "stop_sequence" and end.stop_sequence_matched == word
    assert end.text == free.text[: free.text.index(word)]
    assert "".join(e.text for e in events[:-1]) == end.text


def test_eos_ends_generation(engine):
    """Declare the first greedy token to be EOS: generation ends there, EOS id kept, its text not emitted."""
    *_, ref = engine.generate(Request(prompt="Hello.", max_tokens=5, sampling=SamplingParams(temperature=0.0)))
    first, saved = ref.token_ids[0], engine.eos_token_id
    try:
        engine.eos_token_id = first
        events = list(engine.generate(Request(prompt="Hello.", max_tokens=5, sampling=SamplingParams(temperature=0.0))))
        end = events[-1]
        assert end.stop_reason == "eos" and end.token_ids == [first] and end.text == "" and len(events) == 1
    finally:
        engine.eos_token_id = saved


def test_context_overflow_is_a_clear_error(engine):
    with pytest.raises(ContextOverflow, match=r"exceeds the model's context length 1024"):
        engine.start(Request(prompt="hi " * 1000, max_tokens=100))


def test_bad_requests(engine):
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.start(Request(prompt="hi", max_tokens=0))
    with pytest.raises(InvalidRequest, match="no tokens"):
        engine.start(Request(prompt="", max_tokens=3))
    with pytest.raises(InvalidRequest, match="stop"):
        engine.start(Request(prompt="hi", max_tokens=3, stop=list("abcde")))


def test_cancel_between_steps(engine):
    seq = engine.start(Request(prompt="Hello.", max_tokens=50))
    engine.step([seq])
    seq.cancelled.set()
    events = engine.step([seq])[0]
    assert events[-1].stop_reason == "cancelled" and seq.cache is None
    assert np.isfinite(seq.last_logits).all()
