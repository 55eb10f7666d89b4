"""Write a Llama-family GGUF with seeded random weights, laid out as llama.cpp's converter writes one
(attn_q/attn_k rows permuted), with a real tokenizer's metadata (default: the SmolLM2 GGUF's).

    python scripts/make_llama_gguf.py OUT.gguf [--n-layer 22 --n-embd 2048 --n-head 32 --n-kv-head 4
        --n-ff 5632] [--type F16] [--seed 0]

For shapes the default model does not have (tests/test_llama_synthetic.py writes small ones with mixed
tensor types) and for speed measurements of larger models: write F16, then any llama.cpp type with
scripts/requantize_gguf.py. Random weights: nothing here says anything about a real model's outputs.
K-quant types are written with random fields (gguf-py cannot quantize them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                  "tokenizer.chat_template")


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy: HF rows -> GGUF rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


#: K-quant fields drawn at random (gguf-py cannot quantize them): float16 super-block scales that give
#: weights of ~0.05, every other byte uniform. The file then holds *these* weights, not x.
K_SCALES = {QT.Q4_K: ((0, 1.5e-4), (2, 1.5e-3)), QT.Q5_K: ((0, 8e-5), (2, 1.5e-3)), QT.Q6_K: ((208, 4e-5),)}


def encode(x: np.ndarray, qt: QT) -> np.ndarray:
    if qt == QT.F32:
        return x.astype(np.float32)
    if qt == QT.F16:
        return x.astype(np.float16)
    if qt in K_SCALES:
        size = {QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210}[qt]
        rng = np.random.default_rng(int(np.abs(x).sum() * 1e3) % 2**32)
        blocks = rng.integers(0, 256, (x.shape[0], x.shape[1] // 256, size), dtype=np.uint8)
        for offset, scale in K_SCALES[qt]:
            d = (rng.uniform(0.5, 1.0, blocks.shape[:2]) * scale).astype(np.float16)
            blocks[..., offset : offset + 2] = d[..., None].view(np.uint8).reshape(blocks.shape[:2] + (2,))
        return blocks.reshape(x.shape[0], -1)
    return gguf.quants.quantize(x.astype(np.float32), qt)


def write_llama_gguf(path, tok_meta: dict, *, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_ff=96, seed=0,
                     tied=True, types=None, arch="llama", extra_kv=None, drop=(), extra_tensors=None, rope_base=10000.0,
                     eps=1e-6, meta_n_ff=None, keep_weights=True, n_ctx=256):
    """A small Llama GGUF laid out as llama.cpp's converter writes one (attn_q/attn_k rows permuted).

    Returns the HF-layout float32 weights the file was made from (before quantization)."""
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head
    vocab = len(tok_meta["tokenizer.ggml.tokens"])
    types = {"attn_q": QT.Q8_0, "attn_k": QT.F16, "attn_v": QT.F32, "attn_output": QT.Q4_0, "ffn_gate": QT.Q4_1,
             "ffn_up": QT.Q5_0, "ffn_down": QT.Q5_1, "token_embd": QT.Q8_0, "output": QT.BF16, **(types or {})}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(meta_n_ff or n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_head)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model(tok_meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok_meta["tokenizer.ggml.pre"])
    w.add_token_list(tok_meta["tokenizer.ggml.tokens"])
    w.add_token_types(tok_meta["tokenizer.ggml.token_type"])
    w.add_token_merges(tok_meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok_meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok_meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_meta["tokenizer.chat_template"])

    hf: dict[str, np.ndarray] = {}

    def tensor(name, shape, scale, kind=None, offset=0.0):
        x = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset))
        if keep_weights:
            hf[name] = x
        if name in drop:
            return
        stored = x
        if ".attn_q." in name:
            stored = llamacpp_permute(x, n_head, n_head)
        elif ".attn_k." in name:
            stored = llamacpp_permute(x, n_head, n_kv_head)
        qt = types.get(kind, QT.F32) if kind else QT.F32
        data = encode(stored, qt)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)

    tensor("token_embd.weight", (vocab, n_embd), 1.0, "token_embd")
    tensor("output_norm.weight", (n_embd,), 0.1, offset=1.0)
    if not tied:
        tensor("output.weight", (vocab, n_embd), 0.5, "output")
    for i in range(n_layer):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", (n_embd,), 0.1, offset=1.0)
        tensor(p + "attn_q.weight", (n_head * hd, n_embd), 0.3, "attn_q")
        tensor(p + "attn_k.weight", (n_kv_head * hd, n_embd), 0.3, "attn_k")
        tensor(p + "attn_v.weight", (n_kv_head * hd, n_embd), 0.2, "attn_v")
        tensor(p + "attn_output.weight", (n_embd, n_head * hd), 0.1, "attn_output")
        tensor(p + "ffn_norm.weight", (n_embd,), 0.1, offset=1.0)
        tensor(p + "ffn_gate.weight", (n_ff, n_embd), 0.2, "ffn_gate")
        tensor(p + "ffn_up.weight", (n_ff, n_embd), 0.2, "ffn_up")
        tensor(p + "ffn_down.weight", (n_embd, n_ff), 0.1, "ffn_down")
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def tokenizer_metadata(path) -> dict:
    """The tokenizer keys of a GGUF file's metadata (TOKENIZER_KEYS)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llorch_cpud.formats.gguf import GGUFFile

    f = GGUFFile.open(Path(path))
    return {k: f.metadata[k] for k in TOKENIZER_KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n-layer", type=int, default=22)
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--n-head", type=int, default=32)
    ap.add_argument("--n-kv-head", type=int, default=4)
    ap.add_argument("--n-ff", type=int, default=5632)
    ap.add_argument("--type", default="F16", help="ggml type of every matrix (F32, F16, Q8_0, Q4_0, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", help="GGUF whose tokenizer metadata to copy (default: the embedded SmolLM2)")
    a = ap.parse_args()
    if a.tokenizer_from is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from llorch_cpud.formats import default_model_path

        a.tokenizer_from = default_model_path()
    qt = QT[a.type]
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd", "output")
    write_llama_gguf(a.out, tokenizer_metadata(a.tokenizer_from), n_layer=a.n_layer, n_embd=a.n_embd,
                     n_head=a.n_head, n_kv_head=a.n_kv_head, n_ff=a.n_ff, seed=a.seed, tied=True,
                     types={k: qt for k in kinds}, keep_weights=False, n_ctx=2048)
    print(a.out)


if __name__ == "__main__":
    main()
