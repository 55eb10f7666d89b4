"""The GPT-2 tokenizer (tokenizers library, real GPT-2 files) against tiktoken's gpt2 encoding."""

import pytest

from llorch_cpud.tokenizer import Tokenizer, gpt2_tokenizer_files, load_hf_tokenizer

TEXTS = [
    "Hello.",
    "What is the answer to life, the universe, and everything?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n\treturn fibonacci(n-1) + fibonacci(n-2)\n",
    "Café naïve — Zürich, São Paulo, Ελληνικά, русский",
    "東京は日本の首都です。北京欢迎你",
    "emoji 🚀🔥👍🏽 and flags 🇫🇷 and zwj 👨‍👩‍👧",
    "   leading spaces, trailing   \n\n\n  whitespace\t\truns     ",
    "digits 1234567890 3.14159 1,000,000 0x1F",
    "<|endoftext|>a document boundary<|endoftext|>",
    "'s 're 've 'll 'd 'm 't don't I'M",
    "",
]


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    vocab, merges = gpt2_tokenizer_files()
    ranks = data_gym_to_mergeable_bpe_ranks(  # the hashes prove these are OpenAI's own GPT-2 files
        vocab_bpe_file=str(merges),
        encoder_json_file=str(vocab),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding(name="gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="module")
def tok(gpt2_small) -> Tokenizer:
    return load_hf_tokenizer(gpt2_small, eos_token_id=50256)


def test_hello_encodes_as_spec(tok):
    assert tok.encode("Hello.") == [15496, 13]


@pytest.mark.parametrize("text", TEXTS)
def test_agrees_with_tiktoken_and_round_trips(tok, tiktoken_gpt2, text):
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


def test_tokenizer_json_equals_vocab_and_merges(tok, gpt2_medium_ish):
    other = load_hf_tokenizer(gpt2_medium_ish, eos_token_id=50256)  # built from tokenizer.json
    for text in TEXTS:
        assert other.encode(text) == tok.encode(text)


def test_byte_level_pieces_decode_with_replacement_until_complete(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1  # the rocket is split over several byte tokens
    assert tok.decode(ids[:1]).endswith("\ufffd")
    assert tok.decode(ids) == "🚀"
