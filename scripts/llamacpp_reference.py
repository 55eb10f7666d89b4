#!/usr/bin/env python3
"""Produce llama.cpp reference outputs (tokens, greedy continuations, logits)
for a GGUF model, using llama-cpp-python.

This script is NOT part of the llorch-cpud runtime. It is run once, in a
separate venv that has llama-cpp-python installed, to generate the golden
files under tests/data/llamacpp/ which our own implementation is compared to.

Usage (example):

    /work/llamacpp-venv/bin/python scripts/llamacpp_reference.py \
        --model /work/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out tests/data/llamacpp

Outputs in --out:
  llamacpp_smollm2.json          header + per-prompt records
  <slug>.last_logits.npy         float32[n_vocab] logits at the last prompt position

Per prompt the JSON records:
  prompt, slug, prompt_bytes_hex,
  prompt_token_ids          tokenized exactly as llama.cpp does for inference
                            (llama_tokenize with add_special=True; BOS only if
                            the vocab's add_bos flag is set),
  prompt_token_pieces       per-token detokenized text (for humans; partial
                            UTF-8 shown as U+FFFD, exact bytes in *_hex),
  greedy_token_ids          N greedy new tokens (argmax, manual eval loop, no
                            sampler; generation does NOT stop at EOS),
  greedy_text               llm.detokenize(greedy_token_ids) decoded as UTF-8
                            (errors="replace"); greedy_text_bytes_hex is exact;
                            greedy_text_special also renders special tokens,
  eos_positions             indices into greedy_token_ids equal to the EOS id,
  steps[i]                  for greedy step i: top5 [[id, logit], ...] and
                            gap = top1 logit - top2 logit (logits of the
                            distribution that produced greedy_token_ids[i]),
  last_logits_file / last_logits_sha256 / last_logits_argmax.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shlex
import sys

import numpy as np

from llorch_cpud.validate.references.llamacpp_ref import ggml_build_info  # the vendored llama.cpp's version

PROMPTS: list[str] = [
    "Hello.",
    "What is the answer to life, the universe, and everything?",
    "def fibonacci(n):\n    ",
    "Café naïve — 東京 🚀 is",
    "Dear Alice,\n\nThank you for the letter.\nI will reply properly soon.\n\nBest,\n",
    "Order 66:   12345  items\t\tat  3.14159 each;    total =",
    "The capital of France is",
    "Once upon a time",
    # special=False: the ChatML markers are tokenized as plain text, NOT as the
    # special tokens <|im_start|>/<|im_end|> (ids 1/2) -- a tokenizer edge case.
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces and trailing spaces   ",
]

N_GREEDY = 24
TOPK = 5
N_CTX = 1024
N_THREADS = 2


def slugify(text: str, idx: int) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:32].strip("_")
    return f"p{idx:02d}_{s or 'prompt'}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def topk(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    # stable: sort by (-logit, id) so ties resolve to the lower id, like argmax
    idx = np.lexsort((np.arange(logits.shape[0]), -logits.astype(np.float64)))[:k]
    return [(int(i), float(logits[i])) for i in idx]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="path to .gguf")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    os.makedirs(args.out, exist_ok=True)

    llm = Llama(
        model_path=args.model,
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        logits_all=True,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    md = dict(llm.metadata)

    # --- tokenizer flags -------------------------------------------------
    md_add_bos_raw = md.get("tokenizer.ggml.add_bos_token")
    vocab_add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    if md_add_bos_raw is not None:
        md_add_bos = str(md_add_bos_raw).lower() == "true"
        if md_add_bos != vocab_add_bos:
            raise SystemExit(
                f"metadata add_bos_token={md_add_bos_raw!r} but llama.cpp vocab "
                f"add_bos={vocab_add_bos}"
            )
    add_bos = vocab_add_bos  # what llama.cpp itself uses (common_tokenize add_special=true)
    bos_id = int(llm.token_bos())
    eos_id = int(llm.token_eos())
    md_eos = md.get("tokenizer.ggml.eos_token_id")
    if md_eos is not None and int(md_eos) != eos_id:
        raise SystemExit(f"metadata eos {md_eos} != llama.cpp eos {eos_id}")

    records = []
    for idx, prompt in enumerate(PROMPTS):
        slug = slugify(prompt, idx)
        pbytes = prompt.encode("utf-8")
        ids = llm.tokenize(pbytes, add_bos=add_bos, special=False)
        # Cross-check: llama_tokenize(add_special=True) is llama.cpp's default
        # for inference (llama-cli / llama-server); it only prepends BOS when
        # the vocab add_bos flag is set. Must equal what we recorded.
        ids_default = llm.tokenize(pbytes, add_bos=True, special=False)
        if ids_default != ids:
            raise SystemExit(f"{slug}: add_bos={add_bos} ids differ from llama.cpp default")
        ids_nobos = llm.tokenize(pbytes, add_bos=False, special=False)
        assert ids_nobos == [t for t in ids if not (add_bos and t == bos_id)][: len(ids_nobos)]
        pieces_b = [llm.detokenize([t], special=True) for t in ids]
        pieces = [b.decode("utf-8", errors="replace") for b in pieces_b]
        pieces_hex = [b.hex() for b in pieces_b]

        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[llm.n_tokens - 1, :n_vocab], dtype=np.float32, copy=True)
        assert last.shape == (n_vocab,) and np.isfinite(last).all()
        npy_name = f"{slug}.last_logits.npy"
        np.save(os.path.join(args.out, npy_name), last)

        gen: list[int] = []
        steps = []
        cur = last
        for _ in range(N_GREEDY):
            t5 = topk(cur, TOPK)
            tok = int(np.argmax(cur))
            assert tok == t5[0][0]
            steps.append(
                {"top5": [[i, v] for i, v in t5], "gap": float(t5[0][1] - t5[1][1])}
            )
            gen.append(tok)
            if len(gen) == N_GREEDY:
                break
            llm.eval([tok])
            cur = np.array(llm.scores[llm.n_tokens - 1, :n_vocab], dtype=np.float32, copy=True)

        gen_bytes = llm.detokenize(gen)
        records.append(
            {
                "slug": slug,
                "prompt": prompt,
                "prompt_bytes_hex": pbytes.hex(),
                "prompt_token_ids": ids,
                "prompt_token_pieces": pieces,
                "prompt_token_pieces_hex": pieces_hex,
                "n_prompt_tokens": len(ids),
                "greedy_token_ids": gen,
                "greedy_text": gen_bytes.decode("utf-8", errors="replace"),
                "greedy_text_bytes_hex": gen_bytes.hex(),
                "greedy_text_special": llm.detokenize(gen, special=True).decode(
                    "utf-8", errors="replace"
                ),
                "eos_positions": [i for i, t in enumerate(gen) if t == eos_id],
                "steps": steps,
                "last_logits_file": npy_name,
                "last_logits_sha256": hashlib.sha256(last.tobytes()).hexdigest(),
                "last_logits_argmax": int(np.argmax(last)),
            }
        )
        print(f"{slug}: {len(ids)} prompt toks -> {gen_bytes!r}", file=sys.stderr)

    try:
        sysinfo = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    except Exception as e:  # pragma: no cover
        sysinfo = f"unavailable: {e!r}"

    ggml_version, ggml_commit = ggml_build_info(llama_cpp)

    header = {
        "generator": "scripts/llamacpp_reference.py",
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": sysinfo.strip(),
        "ggml_version": ggml_version,
        "ggml_commit": ggml_commit,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "gguf_file": os.path.basename(args.model),
        "gguf_sha256": sha256_file(args.model),
        "n_ctx": N_CTX,
        "n_threads": N_THREADS,
        "logits_all": True,
        "n_vocab": n_vocab,
        "n_greedy": N_GREEDY,
        "topk": TOPK,
        "tokenize": {
            "call": "llm.tokenize(text.encode('utf-8'), add_bos=ADD_BOS, special=False)",
            "add_bos_used": add_bos,
            "metadata_add_bos_token": md_add_bos_raw,
            "llama_vocab_get_add_bos": vocab_add_bos,
            "note": "llama_tokenize(add_special=True) prepends BOS only if the vocab "
            "add_bos flag is set; verified identical to the ids recorded here.",
        },
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "metadata_eos_token_id": md_eos,
        "greedy": "manual loop: eval(prompt); tok=argmax(last logits); eval([tok]); repeat; "
        "no sampler, no stop at EOS",
        "metadata": {k: v for k, v in md.items() if k != "tokenizer.chat_template"},
    }

    out_json = os.path.join(args.out, "llamacpp_smollm2.json")
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump({"header": header, "prompts": records}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
