"""Tokenizer from GGUF metadata (llorch_cpud.tokenizer.gguf).

References:
- llama.cpp, the GGUF format's reference implementation: ids recorded from llama-cpp-python
  0.3.36 (`Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=True, special=True)`),
  and checked live when `llama_cpp` is importable;
- transformers' own GGUF tokenizer converter (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
Where the two disagree we follow llama.cpp, and the test says where and why.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from llorch_cpud.errors import ModelLoadError
from llorch_cpud.formats.gguf import GGUFFile
from llorch_cpud.tokenizer.gguf import GGUFTokenizerInfo, load_gguf_tokenizer, tokenizer_from_gguf


# SmolLM2-135M-Instruct (tokenizer.ggml.pre = "smollm", add_bos_token = false), ids from llama.cpp.
LLAMA_CPP_SMOLLM = [
    ("Hello.", [19556, 30]),
    ("Hello world! 123", [19556, 905, 17, 216, 33, 34, 35]),
    ("12345 678", [33, 34, 35, 36, 37, 216, 38, 39, 40]),
    ("def f(x):\n    return x**2  # sq\n", [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 15375, 198]),
    ("  multiple   spaces\t\ttabs\n\n\nnl", [216, 2701, 256, 5600, 197, 197, 100, 7366, 1116, 198, 14861]),
    ("Café déjà vu, naïve Ångström",
     [51, 1939, 2756, 32564, 90, 16739, 386, 101, 28, 15486, 46494, 5549, 223, 863, 1321, 45682]),
    ("日本語のテキスト、中文字符",
     [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 29917, 28589,
      29184, 36518, 40562, 116]),
    ("emoji 🦙🔥👍🏽 end", [391, 33777, 15107, 116, 243, 10813, 238, 115, 10813, 235, 231, 10813, 233, 138, 1112]),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]),
    ("I'm you've they'LL", [57, 5248, 346, 3543, 502, 23, 16421]),
    ("x=1.5e-3;y=0x1F", [104, 45, 33, 30, 37, 85, 29, 35, 43, 105, 45, 32, 104, 33, 54]),
    (" leading space", [2899, 1898]),
    ("trailing  ", [4861, 4966, 256]),
    ("\xa0nbsp\u2009thin", [15442, 94, 32093, 321, 227, 39200]),
    ("a\r\nb\rc", [81, 201, 198, 82, 201, 83]),
    ("½ ² ٣ ४", [16738, 216, 19133, 216, 164, 113, 216, 9310, 120]),
    ("<|endoftext|><|im_end|>x<file_sep>", [0, 2, 104, 5]),
    ("<|im_start", [44, 108, 306, 79, 3738]),
    ("\n\n\n", [16506]),
    ("", []),
]
# transformers' GGUF converter has no "smollm" entry and pre-tokenizes with plain GPT-2's regex
# (" ?\p{N}+"); llama.cpp and SmolLM2's own tokenizer.json split every \p{N} character alone.
# On this vocabulary that only changes ids for non-ASCII numerals, where " ½"/" ²" get merged.
TRANSFORMERS_DIFFERS = {"½ ² ٣ ४"}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smol_file(smollm_path) -> GGUFFile:
    return GGUFFile.open(smollm_path)


@pytest.fixture(scope="module")
def info(smol_file) -> GGUFTokenizerInfo:
    return load_gguf_tokenizer(smol_file)


def _gguf_dir(src: str, tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("hf_gguf")
    name = os.path.basename(src)
    try:
        os.symlink(src, folder / name)
    except OSError:
        import shutil

        shutil.copyfile(src, folder / name)
    return str(folder), name


@pytest.fixture(scope="module")
def hf_tok(smollm_path, tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: no reference tokenizer")
    pytest.importorskip("gguf")
    folder, name = _gguf_dir(smollm_path, tmp_path_factory)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


# ---------------------------------------------------------------------------- SmolLM2, real vocabulary


@pytest.mark.parametrize("text,expected", LLAMA_CPP_SMOLLM, ids=range(len(LLAMA_CPP_SMOLLM)))
def test_ids_match_llama_cpp(info, text, expected):
    assert info.encode(text) == expected


@pytest.mark.parametrize("text", [t for t, _ in LLAMA_CPP_SMOLLM if t not in TRANSFORMERS_DIFFERS])
def test_ids_match_transformers(info, hf_tok, text):
    assert info.encode(text) == hf_tok.encode(text, add_special_tokens=True)


def test_where_transformers_differs_we_follow_llama_cpp(info, hf_tok):
    for text in TRANSFORMERS_DIFFERS:
        expected = dict(LLAMA_CPP_SMOLLM)[text]
        assert info.encode(text) == expected
        # the pre-tokenizers really differ: ours isolates each numeral, transformers' keeps " ²" together
        ours = [p for p, _ in info.tokenizer.pre_tokenizer.pre_tokenize_str(" ²")]
        assert ours == ["Ġ", "Â²"]


@pytest.mark.parametrize("text", [t for t, _ in LLAMA_CPP_SMOLLM])
def test_decode_round_trips(info, text):
    ids = info.encode(text)
    assert info.decode(ids) == text
    assert info.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_hello(info, hf_tok):
    ids = info.encode("Hello.")
    assert ids == [19556, 30]
    assert ids == hf_tok.encode("Hello.")
    assert info.tokenizer.encode("Hello.").ids == ids


def test_special_ids_and_flags(info, smol_file):
    assert info.bos_id == 1 and info.eos_id == 2
    assert info.add_bos is False and info.add_eos is False
    assert info.eot_id == 2 and info.stop_ids == {2}
    assert info.pad_id == 2 and info.unk_id == 0
    assert info.model == "gpt2" and info.pre == "smollm"
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.control_ids == frozenset(range(17))
    assert info.tokenizer.get_vocab_size(with_added_tokens=True) == 49152
    tokens = smol_file.metadata["tokenizer.ggml.tokens"]
    for i in range(17):  # every control token is one id, and is dropped when decoding for display
        assert info.encode(tokens[i]) == [i], tokens[i]
        assert info.decode([19556, i, 30], skip_special_tokens=True) == "Hello."
    assert info.decode([1, 4093, 198, 6004, 2], skip_special_tokens=True) == "user\nhi"


def test_tokenizer_from_gguf_returns_a_tokenizer(smol_file):
    tok = tokenizer_from_gguf(smol_file.metadata)
    assert isinstance(tok, Tokenizer)
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]


def test_live_llama_cpp_if_available(info, smollm_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: recorded ids used instead")
    model = llama_cpp.Llama(model_path=smollm_path, vocab_only=True, verbose=False)
    for text, _ in LLAMA_CPP_SMOLLM:
        assert info.encode(text) == model.tokenize(text.encode("utf-8"), add_bos=True, special=True), text


# ---------------------------------------------------------------------------- pre-tokenizer choice (synthetic vocabulary)


def byte_level_metadata(pre: str, extra_tokens=(), merges=(), **kw):
    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>"] + alphabet + list(extra_tokens)
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    md.update(kw)
    return md


def test_pre_tokenizer_follows_tokenizer_ggml_pre():
    """With merges that join digits, "smollm" (digits alone) and "gpt-2" (digit runs) must tokenize differently."""
    extra = ["12", "Ġ1", "Ġ12", "123"]
    merges = ["Ġ 1", "Ġ1 2", "1 2", "12 3"]
    smollm = load_gguf_tokenizer(byte_level_metadata("smollm", extra, merges))
    gpt2 = load_gguf_tokenizer(byte_level_metadata("gpt-2", extra, merges))
    llama3 = load_gguf_tokenizer(byte_level_metadata("llama-bpe", extra, merges))
    vocab = smollm.tokenizer.get_vocab()
    assert smollm.encode(" 12") == [vocab["Ġ"], vocab["1"], vocab["2"]]
    assert gpt2.encode(" 12") == [vocab["Ġ12"]]
    assert gpt2.encode("1234") == [vocab["123"], vocab["4"]]
    # llama3: digits in groups of up to three, no leading space; and llama.cpp adds BOS by default
    assert llama3.add_bos is True
    assert llama3.encode("1234") == [0, vocab["123"], vocab["4"]]
    assert llama3.encode("1234", add_special_tokens=False) == [vocab["123"], vocab["4"]]


def test_add_bos_flag_from_metadata():
    info = load_gguf_tokenizer(byte_level_metadata("gpt-2", **{"tokenizer.ggml.add_bos_token": True}))
    assert info.add_bos is True and info.encode("a")[0] == 0
    info = load_gguf_tokenizer(byte_level_metadata("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}))
    assert info.add_bos is False and info.encode("a") == [info.tokenizer.token_to_id("a")]


def test_user_defined_tokens_are_whole_but_not_special():
    md = byte_level_metadata("gpt-2", ["<think>"])
    md["tokenizer.ggml.token_type"][-1] = 4
    info = load_gguf_tokenizer(md)
    think = info.tokenizer.token_to_id("<think>")
    assert think == len(md["tokenizer.ggml.tokens"]) - 1
    assert info.encode("a<think>b") == [info.tokenizer.token_to_id("a"), think, info.tokenizer.token_to_id("b")]
    assert info.decode([think], skip_special_tokens=True) == "<think>"  # llama.cpp shows user-defined tokens
    assert think not in info.control_ids


# ---------------------------------------------------------------------------- sentencepiece ("llama") vocabulary

SPM_PIECES = ["▁", "t", "h", "e", "a", "n", "d", "o", "r", "l", "w", "▁t", "he", "▁the", "▁a", "an", "▁an", "▁and",
              "nd", "▁w", "or", "▁wor", "ld", "▁world", "▁h", "el", "lo", "▁hel", "▁hello", "e▁", "<|user|>", "H", "W",
              "!", ",", "."]
# ids from llama.cpp for the file written by write_spm_gguf (add_bos defaults to true for sentencepiece)
LLAMA_CPP_SPM = [
    ("the world", [1, 272, 282]),
    ("hello world, and the wor", [1, 259, 271, 268, 285, 282, 293, 276, 272, 280]),
    ("  the  and", [1, 259, 259, 272, 259, 276]),
    ("Hello World!", [1, 259, 290, 284, 285, 259, 291, 279, 281, 292]),
    ("x ü 日", [1, 259, 123, 259, 198, 191, 259, 233, 154, 168]),  # byte fallback
    ("<|user|>the<s>and", [1, 289, 272, 1, 276]),
    ("", [1]),
    ("the\nworld", [1, 272, 13, 269, 279, 281]),
    (" the", [1, 259, 272]),
    ("and  ", [1, 276, 259, 259]),
    ("<s>the", [1, 1, 272]),
]
# transformers' converter (Metaspace, prepend_scheme="first") adds no "▁" when the text already starts
# with a space, and none after an added token; llama.cpp prefixes every text fragment with a space.
SPM_TRANSFORMERS_DIFFERS = {"  the  and", "<|user|>the<s>and", " the", "<s>the"}


def write_spm_gguf(path):
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [4 if p.startswith("<|") else 1 for p in SPM_PIECES]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, value in [("llama.block_count", 1), ("llama.context_length", 64), ("llama.embedding_length", 8),
                       ("llama.feed_forward_length", 16), ("llama.attention.head_count", 2)]:
        w.add_uint32(key, value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


def test_sentencepiece_matches_llama_cpp(spm_path):
    info = load_gguf_tokenizer(GGUFFile.open(spm_path))
    assert info.model == "llama" and info.add_bos is True and info.bos_id == 1 and info.eos_id == 2
    for text, expected in LLAMA_CPP_SPM:
        ids = info.encode(text)
        assert ids == expected, text
        if "<|user|>" not in text:
            assert info.decode(ids, skip_special_tokens=True) == text.replace("<s>", ""), text
    # like llama.cpp, a text fragment after an added token gets its own "▁" prefix, which decodes as a space
    assert info.decode(info.encode("<|user|>the<s>and"), skip_special_tokens=True) == "<|user|> the and"


def test_sentencepiece_matches_transformers(spm_path, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder, name = _gguf_dir(spm_path, tmp_path_factory)
    hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    info = load_gguf_tokenizer(GGUFFile.open(spm_path))
    for text, _ in LLAMA_CPP_SPM:
        if text not in SPM_TRANSFORMERS_DIFFERS:
            assert info.encode(text) == hf.encode(text), text


# ---------------------------------------------------------------------------- errors


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_tokenizer_model():
    md = byte_level_metadata("gpt-2", **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelLoadError) as exc:
        load_gguf_tokenizer(md, source="/models/x.gguf")
    msg = one_line(exc)
    assert "tokenizer.ggml.model" in msg and "'bert'" in msg and "/models/x.gguf" in msg


def test_unknown_pre_tokenizer():
    with pytest.raises(ModelLoadError) as exc:
        load_gguf_tokenizer(byte_level_metadata("some-new-model"))
    msg = one_line(exc)
    assert "tokenizer.ggml.pre" in msg and "'some-new-model'" in msg


@pytest.mark.parametrize("key", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_key(key):
    md = byte_level_metadata("gpt-2")
    del md[key]
    with pytest.raises(ModelLoadError) as exc:
        load_gguf_tokenizer(md)
    assert repr(key) in one_line(exc)


def test_error_names_the_file_when_given_a_gguf_file(spm_path, tmp_path):
    import gguf

    path = str(tmp_path / "notok.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("wordpiece-ish")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as exc:
        load_gguf_tokenizer(GGUFFile.open(path))
    msg = one_line(exc)
    assert path in msg and "'wordpiece-ish'" in msg and "tokenizer.ggml.model" in msg
