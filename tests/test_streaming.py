"""The generation loop's text: UTF-8-complete pieces, stop strings withheld, EOS, limits."""

import numpy as np
import pytest

from llorch_cpud.engine import Engine, EndEvent, Request, TextStream, TokenEvent
from llorch_cpud.errors import ContextOverflow, InvalidRequest
from llorch_cpud.formats import load_model
from llorch_cpud.sampling import SamplingParams
from llorch_cpud.tokenizer import Tokenizer


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


# ---------------------------------------------------------------------------- long generations: exact, bounded work


class CountingInner:
    """A tokenizers.Tokenizer stand-in that counts the ids every decode call is given."""

    def __init__(self, inner):
        self.inner, self.ids, self.calls = inner, 0, 0

    def decode(self, ids, **kw):
        self.ids += len(ids)
        self.calls += 1
        return self.inner.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm2_gguf):
    from llorch_cpud.formats.gguf import GGUFFile
    from llorch_cpud.formats.gguf_load import gguf_tokenizer

    if not smollm2_gguf.is_file():
        pytest.skip(f"{smollm2_gguf} is missing")
    return gguf_tokenizer(GGUFFile.open(str(smollm2_gguf)))


@pytest.fixture(params=["gpt2", "smollm2"])
def any_tokenizer(request, engine):
    return engine.tokenizer if request.param == "gpt2" else request.getfixturevalue("smollm_tokenizer")


def long_ids(tok, kind: str, n: int = 3000, seed: int = 0) -> list[int]:
    """`random`: uniform over the vocabulary. `bytes`: mostly tokens whose text alone is or ends in U+FFFD
    (lone bytes, partial characters), so invalid UTF-8 runs and held-back characters are everywhere."""
    rng = np.random.default_rng(seed)
    vocab = tok.vocab_size
    if kind == "random":
        return [int(i) for i in rng.integers(0, vocab, n)]
    partial = [i for i in range(vocab) if i != tok.eos_token_id and tok.decode([i]).endswith("\ufffd")]
    return [int(rng.choice(partial)) if rng.random() < 0.7 else int(rng.integers(0, vocab)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["random", "bytes"])
def test_long_generation_streams_exactly_the_full_decode(any_tokenizer, kind):
    """3,000 tokens: the pieces never retract anything (each extends a prefix of the final text, so no incomplete
    character was released as U+FFFD) and concatenate to decode(all ids)."""
    tok = any_tokenizer
    ids = long_ids(tok, kind)
    full = tok.decode_generated(ids)
    s = TextStream(tok, [])
    done = 0
    for i in ids:
        piece = s.push(i)
        assert full.startswith(piece, done)
        done += len(piece)
    piece = s.finish()
    assert full.startswith(piece, done) and done + len(piece) == len(full)
    assert s.final_text == full


@pytest.mark.parametrize("kind", ["random", "bytes"])
def test_long_generation_with_a_stop_string(any_tokenizer, kind):
    """A stop string taken from late in the decoded text: released text is the full decode cut there."""
    tok = any_tokenizer
    ids = long_ids(tok, kind, seed=1)
    full = tok.decode_generated(ids)
    stop = next(full[k : k + 3] for k in range(len(full) * 9 // 10, len(full))
                if full[k : k + 3].strip() and "\ufffd" not in full[k : k + 3])
    s = TextStream(tok, [stop])
    out = []
    for i in ids:
        out.append(s.push(i))
        if s.matched:
            break
    assert s.matched == stop and "".join(out) == s.final_text == full[: full.index(stop)]


@pytest.mark.parametrize("kind", ["random", "bytes"])
def test_decode_work_per_token_is_bounded(any_tokenizer, kind):
    """Work, not time: the ids handed to the tokenizer's decode per push stay under a constant that does not grow
    with the length of the generation (re-decoding everything would hand it k ids at token k: 4.5 million here)."""
    tok = any_tokenizer
    counting = CountingInner(tok.inner)
    counted = Tokenizer(inner=counting, eos_token_id=tok.eos_token_id)
    ids = long_ids(tok, kind, seed=2)
    s = TextStream(counted, ["<<never-in-this-text>>", "\x00\x00\x00"])  # stop strings on, never matched
    per_push, out = [], []
    for i in ids:
        before = counting.ids
        out.append(s.push(i))
        per_push.append(counting.ids - before)
        if s.matched:
            break
    out.append(s.finish())
    assert len(per_push) > 1000 and counting.calls >= len(per_push)  # the counter sees the decodes (negative control for a broken count)
    bound = 4 * (TextStream.MAX_PENDING + 1) ** 2  # the worst push: splitting a window of pending U+FFFD text
    assert max(per_push) <= bound, max(per_push)
    assert max(per_push[-500:]) <= bound and sum(per_push[-500:]) <= 10 * 500  # the end costs what the start did
    assert sum(per_push) <= 10 * len(ids), sum(per_push)
    full = tok.decode_generated(ids)
    assert "".join(out) == (full[: full.index(s.matched)] if s.matched else full)


def test_sentencepiece_leading_space_and_byte_fallback_stream_exactly(tmp_path):
    """A SentencePiece GGUF vocabulary (decoder: "▁" -> " ", byte fallback, first leading space stripped): random
    sequences of pieces and byte-encoded characters stream exactly what decoding them all at once gives."""
    from test_gguf_tokenizer import write_spm_gguf

    from llorch_cpud.formats.gguf import GGUFFile
    from llorch_cpud.formats.gguf_load import gguf_tokenizer

    tok = gguf_tokenizer(GGUFFile.open(write_spm_gguf(tmp_path / "spm.gguf")))
    pieces = [tok.inner.token_to_id(p) for p in ["▁", "▁the", "▁world", "he", "lo", "e▁", "<|user|>", "H", "!", "<s>"]]
    chars = [[tok.inner.token_to_id(f"<0x{b:02X}>") for b in c.encode()] for c in ["ü", "日", "🚀", "\n", " "]]
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = []
        for _ in range(int(rng.integers(1, 40))):
            ids += chars[rng.integers(len(chars))] if rng.random() < 0.35 else [pieces[rng.integers(len(pieces))]]
        s = TextStream(tok, [])
        out = [s.push(i) for i in ids] + [s.finish()]
        assert "".join(out) == tok.decode_generated(ids), ids
        assert all("\ufffd" not in p for p in out)
