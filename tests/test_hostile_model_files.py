"""Corrupt and hostile model files, through the real CLI: every one ends in exactly one line `error: ...` naming the
file (and the metadata key, config field or tensor at fault), a non-zero exit, no traceback, and a bounded peak
resident memory - never an allocation or a loop sized by a number read from the file before that number is checked
against the file.

One table: each case edits one of the small synthetic models the suite already makes - a 1-layer Llama GGUF written by
scripts/make_llama_gguf.py (with a byte-level tokenizer of 261 tokens, so the child starts in well under a second)
and the 2-layer GPT-2 folder of tests/conftest.py (`gpt2_small`) - and runs
`python -m llorch_cpud.cli generate --model FILE --max-tokens 1 hi` in a subprocess.

Peak memory is the child's own: a small launcher forks it, `os.wait4`s for exactly that process and reports its
rusage (RUSAGE_CHILDREN in the test process would be the maximum over every child it ever waited for, and a child
forked by pytest itself starts from pytest's resident memory - see _LAUNCHER). The bound, RSS_LIMIT_MB, is justified
next to it. The child also runs under an address-space and a CPU-time limit: guards for this shared machine that turn
a runaway allocation or a hang into a quick failure of the case, not assertions about time.

`test_harness_catches_*` are the negative controls: the same checks flag a traceback, a multi-line error, a silent
success and a child that touches more memory than the bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

gguf = pytest.importorskip("gguf")

from make_llama_gguf import write_llama_gguf  # noqa: E402 (scripts/, on sys.path through conftest)

ROOT = Path(__file__).resolve().parents[1]

#: Peak RSS bound for a child that refuses a file. Measured here: the CLI that *succeeds* on the unmodified files
#: peaks at ~95-100 MB (Python, numpy, tokenizers, the C kernels, a model under 1 MB / 14 MB); refusing a file needs
#: no more than loading it. 256 MB leaves ~150 MB for allocator noise and for the metadata a case's file really
#: holds, while anything sized by an absurd field the loader did not check - 2^30 elements and up, or a per-element
#: loop over a count never compared with the file's size - is gigabytes, and fails the case (or, far earlier, the
#: address-space guard below).
RSS_LIMIT_MB = 256
#: Guards (not assertions): the child's address space (normal runs peak at ~0.4 GB of it: thread stacks, the
#: OpenMP pool, mappings), its CPU seconds, and a wall-clock kill for a child that blocks without using the CPU.
AS_LIMIT_BYTES = 4 << 30
CPU_LIMIT_S = 60
KILL_AFTER_S = 180
#: A one-line error is a sentence, not a dump: longer stderr means a name or a value was printed unbounded.
MAX_LINE_CHARS = 2000


# --------------------------------------------------------------------------- running the CLI


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    max_rss_mb: float


#: Started by the test process, this small Python forks the command, sets the guards in the fork, execs it, and reports
#: the command's own rusage. The test process cannot fork it itself: a fork's peak RSS starts at its parent's resident
#: memory (the kernel carries the pre-exec high-water mark over an exec), and pytest, once a fixture has imported
#: torch, is ~300 MB - every child would "peak" there. Forked from this launcher (~10 MB), a child's peak is its own.
_LAUNCHER = r"""
import json, os, resource, sys
report, limits, argv = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), tuple(value))
    os.execv(sys.executable, [sys.executable, *argv])
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "max_rss_kb": usage.ru_maxrss}, f)
"""


def run_child(argv: list[str]) -> Run:
    """Run `python ARGV...` from the repository root: its exit code, output, and its own peak RSS."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    limits = {"RLIMIT_AS": [AS_LIMIT_BYTES] * 2, "RLIMIT_CPU": [CPU_LIMIT_S, CPU_LIMIT_S + 5]}
    with tempfile.TemporaryDirectory() as tmp:
        out, err, report = Path(tmp, "out"), Path(tmp, "err"), Path(tmp, "report.json")
        with out.open("wb") as o, err.open("wb") as e:
            p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), json.dumps(limits), *argv],
                                 stdin=subprocess.DEVNULL, stdout=o, stderr=e, cwd=ROOT, env=env,
                                 start_new_session=True)
            guard = threading.Timer(KILL_AFTER_S, lambda: os.killpg(p.pid, signal.SIGKILL))
            guard.start()
            try:
                p.wait()
            finally:
                guard.cancel()
        stdout, stderr = (f.read_bytes().decode("utf-8", "replace") for f in (out, err))
        if not report.exists():  # the launcher was killed by the guard (or failed itself)
            return Run(p.returncode or -signal.SIGKILL, stdout, stderr, 0.0)
        rep = json.loads(report.read_text())
        return Run(rep["returncode"], stdout, stderr, rep["max_rss_kb"] / 1024)  # Linux: kilobytes


def run_cli(model: Path) -> Run:
    return run_child(["-m", "llorch_cpud.cli", "generate", "--model", str(model), "--max-tokens", "1",
                      "--temperature", "0", "hi"])


def problems(r: Run, names: list[str]) -> list[str]:
    """What is wrong with a child that should have refused a file with one line naming each of `names`."""
    found = []
    if r.returncode == 0:
        found.append("exit status 0: the file was accepted")
    elif r.returncode < 0:
        found.append(f"killed by signal {signal.Signals(-r.returncode).name} (guard: hang or runaway memory)")
    if "Traceback" in r.stderr:
        found.append("a traceback on stderr")
    lines = r.stderr.splitlines()
    if len(lines) != 1 or not lines[0].strip():
        found.append(f"stderr is {len(lines)} lines, not one")
    elif not lines[0].startswith("error: "):
        found.append("stderr does not start with 'error: '")
    if len(r.stderr) > MAX_LINE_CHARS:
        found.append(f"stderr is {len(r.stderr)} characters long")
    for name in names:
        if name not in r.stderr:
            found.append(f"does not name {name!r}")
    if r.max_rss_mb > RSS_LIMIT_MB:
        found.append(f"peak RSS {r.max_rss_mb:.0f} MB > {RSS_LIMIT_MB} MB")
    return found


def describe(r: Run, found: list[str]) -> str:
    return f"{'; '.join(found)}\n--- stderr ({r.max_rss_mb:.0f} MB peak RSS):\n{r.stderr[-3000:]}"


# --------------------------------------------------------------------------- GGUF, rewritten field by field

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


def enc(vtype: int, value) -> bytes:
    """A GGUF value's bytes (little-endian), without its type id."""
    if vtype == STR:
        b = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(b)) + b
    return struct.pack("<" + _SCALAR[vtype], value)


def enc_array(itype: int, items) -> bytes:
    return struct.pack("<IQ", itype, len(items)) + b"".join(enc(itype, x) for x in items)


def _value_end(buf: bytes, offs: int, vtype: int) -> int:
    if vtype in _SCALAR:
        return offs + struct.calcsize("<" + _SCALAR[vtype])
    if vtype == STR:
        return offs + 8 + struct.unpack_from("<Q", buf, offs)[0]
    assert vtype == ARR, vtype
    itype, n = struct.unpack_from("<IQ", buf, offs)
    offs += 12
    if itype in _SCALAR:
        return offs + n * struct.calcsize("<" + _SCALAR[itype])
    for _ in range(n):
        offs = _value_end(buf, offs, itype)
    return offs


@dataclass
class Tensor:
    name: str
    dims: list[int]  # ggml order: dims[0] = ne[0], the row length
    ttype: int
    offset: int  # from the start of the data section
    n_dims: int | None = None  # written in place of len(dims) when set


@dataclass
class Gguf:
    """A GGUF file as lists an edit can change freely (this parser is the test's own, independent of the loader's):
    metadata [key, value type id, value bytes], tensor infos, and the data section. `write` lays it out again with
    32-byte alignment; the counts in the header are the lists' lengths unless overridden."""

    kv: list[list]
    tensors: list[Tensor]
    data: bytes
    n_kv: int | None = None
    n_tensors: int | None = None

    @classmethod
    def read(cls, path: Path) -> "Gguf":
        buf = path.read_bytes()
        magic, version, n_t, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        assert magic == b"GGUF" and version == 3
        offs, kv, tensors = 24, [], []
        for _ in range(n_kv):
            (klen,) = struct.unpack_from("<Q", buf, offs)
            key = buf[offs + 8 : offs + 8 + klen].decode()
            (vtype,) = struct.unpack_from("<I", buf, offs + 8 + klen)
            offs += 12 + klen
            end = _value_end(buf, offs, vtype)
            kv.append([key, vtype, buf[offs:end]])
            offs = end
        for _ in range(n_t):
            (nlen,) = struct.unpack_from("<Q", buf, offs)
            name = buf[offs + 8 : offs + 8 + nlen].decode()
            offs += 8 + nlen
            (nd,) = struct.unpack_from("<I", buf, offs)
            dims = list(struct.unpack_from(f"<{nd}Q", buf, offs + 4))
            ttype, toff = struct.unpack_from("<IQ", buf, offs + 4 + 8 * nd)
            offs += 4 + 8 * nd + 12
            tensors.append(Tensor(name, dims, ttype, toff))
        return cls(kv, tensors, buf[offs + (-offs % 32) :])

    def to_bytes(self) -> bytes:
        out = bytearray(struct.pack("<4sIQQ", b"GGUF", 3, len(self.tensors) if self.n_tensors is None else self.n_tensors,
                                    len(self.kv) if self.n_kv is None else self.n_kv))
        for key, vtype, payload in self.kv:
            out += enc(STR, key) + struct.pack("<I", vtype) + payload
        for t in self.tensors:
            out += enc(STR, t.name) + struct.pack("<I", len(t.dims) if t.n_dims is None else t.n_dims)
            out += b"".join(struct.pack("<Q", d) for d in t.dims) + struct.pack("<IQ", t.ttype, t.offset)
        out += b"\0" * (-len(out) % 32)
        return bytes(out + self.data)

    def set(self, key: str, vtype: int, payload: bytes) -> None:
        """Replace the key's type and value in place (or append the key)."""
        for entry in self.kv:
            if entry[0] == key:
                entry[1:] = [vtype, payload]
                return
        self.kv.append([key, vtype, payload])

    def value(self, key: str) -> tuple[int, bytes]:
        return next((e[1], e[2]) for e in self.kv if e[0] == key)

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)


def _bytes_of(g: Gguf, patch: Callable[[bytearray], None]) -> bytes:
    data = bytearray(g.to_bytes())
    patch(data)
    return bytes(data)


def tiny_tokenizer_metadata() -> dict:
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, 2 merges ("hi", "Ġh")."""
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["hi", "Ġh"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
            "tokenizer.ggml.merges": ["h i", "Ġ h"], "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> Path:
    """A 1-layer Llama GGUF (64 wide, 4 heads, 2 KV heads, F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensors), ~120 KB."""
    path = tmp_path_factory.mktemp("hostile_llama") / "base.gguf"
    write_llama_gguf(path, tiny_tokenizer_metadata(), n_layer=1, n_embd=64, n_head=4, n_kv_head=2, n_ff=96, tied=True)
    return path


def _array_count(g: Gguf, key: str, count: int) -> None:
    """Rewrite an array's element count, leaving its elements as they are."""
    vtype, payload = g.value(key)
    g.set(key, vtype, payload[:4] + struct.pack("<Q", count) + payload[12:])


def _first_tensor_name_length(g: Gguf, n: int) -> bytes:
    def patch(data: bytearray) -> None:
        at = data.index(enc(STR, g.tensors[0].name))
        data[at : at + 8] = struct.pack("<Q", n)

    return _bytes_of(g, patch)


def _tokens_added(g: Gguf, extra: int) -> None:
    meta = tiny_tokenizer_metadata()
    tokens = meta["tokenizer.ggml.tokens"] + [f"<extra_{i}>" for i in range(extra)]
    g.set("tokenizer.ggml.tokens", ARR, enc_array(STR, tokens))
    g.set("tokenizer.ggml.token_type", ARR, enc_array(I32, [1] * len(tokens)))


def _tokens_renamed(g: Gguf, texts: dict[int, str]) -> None:
    tokens = tiny_tokenizer_metadata()["tokenizer.ggml.tokens"]
    for i, text in texts.items():
        tokens[i] = text
    g.set("tokenizer.ggml.tokens", ARR, enc_array(STR, tokens))


def _spm(g: Gguf, tokens: list[str]) -> None:
    """Turn the tokenizer into a sentencepiece ("llama") one over `tokens`."""
    g.set("tokenizer.ggml.model", STR, enc(STR, "llama"))
    g.set("tokenizer.ggml.tokens", ARR, enc_array(STR, tokens))
    g.set("tokenizer.ggml.token_type", ARR, enc_array(I32, [1] * len(tokens)))
    g.set("tokenizer.ggml.scores", ARR, enc_array(F32, [0.0] * len(tokens)))


def _spm_base_tokens() -> list[str]:
    return tiny_tokenizer_metadata()["tokenizer.ggml.tokens"]


NAN, INF = float("nan"), float("inf")
Q8_1 = 9

# (case id, edit of the parsed base file - it may return the file's bytes itself -, what the message must name
#  besides the file). The edits of the container come first, then model keys, then the tokenizer.
GGUF_CASES: list[tuple[str, Callable[[Gguf], bytes | None], list[str]]] = [
    # -- header counts
    ("tensor_count_2^40", lambda g: setattr(g, "n_tensors", 2**40), ["tensor count"]),
    ("tensor_count_int64_max", lambda g: setattr(g, "n_tensors", 2**63 - 1), ["tensor count"]),
    ("tensor_count_uint64_max", lambda g: setattr(g, "n_tensors", 2**64 - 1), ["tensor count"]),
    ("kv_count_2^40", lambda g: setattr(g, "n_kv", 2**40), ["metadata key count"]),
    ("kv_count_int64_max", lambda g: setattr(g, "n_kv", 2**63 - 1), ["metadata key count"]),
    ("kv_count_one_too_many", lambda g: setattr(g, "n_kv", len(g.kv) + 1), []),
    # -- metadata strings and arrays
    ("key_length_2^62", lambda g: _bytes_of(g, lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 2**62))),
     ["metadata key 0"]),
    ("string_length_2^62", lambda g: g.set("general.architecture", STR, struct.pack("<Q", 2**62) + b"llama"),
     ["'general.architecture'"]),
    ("string_length_past_file",
     lambda g: g.set("tokenizer.chat_template", STR, struct.pack("<Q", 10**7) + g.value("tokenizer.chat_template")[1][8:]),
     ["'tokenizer.chat_template'"]),
    ("array_length_2^40_numbers", lambda g: _array_count(g, "tokenizer.ggml.token_type", 2**40),
     ["'tokenizer.ggml.token_type'"]),
    ("array_length_2^62_strings", lambda g: _array_count(g, "tokenizer.ggml.tokens", 2**62), ["'tokenizer.ggml.tokens'"]),
    ("array_length_past_file", lambda g: _array_count(g, "tokenizer.ggml.token_type", 10**7),
     ["'tokenizer.ggml.token_type'"]),
    ("array_of_arrays", lambda g: g.set("tokenizer.ggml.merges", ARR, struct.pack("<IQ", ARR, 1) + enc_array(STR, ["h i"])),
     ["'tokenizer.ggml.merges'"]),
    ("array_of_unknown_type", lambda g: g.set("tokenizer.ggml.merges", ARR, struct.pack("<IQ", 99, 1) + b"\0" * 8),
     ["'tokenizer.ggml.merges'"]),
    ("value_type_unknown", lambda g: g.set("general.name", 13, b"\0" * 8), ["'general.name'"]),
    ("value_type_uint32_max", lambda g: g.set("general.name", 0xFFFFFFFF, b"\0" * 8), ["'general.name'"]),
    ("duplicate_key", lambda g: g.kv.append(["llama.block_count", U32, enc(U32, 1)]), ["'llama.block_count'"]),
    ("alignment_0", lambda g: g.set("general.alignment", U32, enc(U32, 0)), ["'general.alignment'"]),
    ("alignment_48", lambda g: g.set("general.alignment", U32, enc(U32, 48)), ["'general.alignment'"]),
    ("alignment_as_string", lambda g: g.set("general.alignment", STR, enc(STR, "32")), ["'general.alignment'"]),
    # -- tensor infos
    ("tensor_name_length_2^62", lambda g: _first_tensor_name_length(g, 2**62), ["tensor 0"]),
    ("tensor_name_1MB", lambda g: setattr(g.tensor("output_norm.weight"), "name", "x" * (1 << 20)), ["'xxxx"]),
    ("tensor_n_dims_5", lambda g: setattr(g.tensor("output_norm.weight"), "dims", [64, 1, 1, 1, 1]),
     ["'output_norm.weight'"]),
    ("tensor_n_dims_uint32_max", lambda g: setattr(g.tensor("output_norm.weight"), "n_dims", 0xFFFFFFFF),
     ["'output_norm.weight'"]),
    ("tensor_n_dims_0", lambda g: setattr(g.tensor("output_norm.weight"), "dims", []), ["'output_norm.weight'"]),
    ("tensor_dim_0", lambda g: setattr(g.tensor("token_embd.weight"), "dims", [64, 0]), ["'token_embd.weight'"]),
    ("tensor_dim_negative", lambda g: setattr(g.tensor("blk.0.attn_v.weight"), "dims", [64, 2**64 - 1]),
     ["'blk.0.attn_v.weight'"]),
    ("tensor_dims_product_overflows", lambda g: setattr(g.tensor("blk.0.attn_v.weight"), "dims", [2**32, 2**32]),
     ["'blk.0.attn_v.weight'"]),
    ("tensor_bigger_than_file", lambda g: setattr(g.tensor("blk.0.attn_v.weight"), "dims", [64, 2**40]),
     ["'blk.0.attn_v.weight'"]),
    ("tensor_offset_past_end", lambda g: setattr(g.tensor("output_norm.weight"), "offset", len(g.data) + 4096),
     ["'output_norm.weight'"]),
    ("tensor_offset_2^63", lambda g: setattr(g.tensor("output_norm.weight"), "offset", 2**63), ["'output_norm.weight'"]),
    ("tensor_offset_misaligned", lambda g: setattr(g.tensor("output_norm.weight"), "offset",
                                                    g.tensor("output_norm.weight").offset + 4), ["'output_norm.weight'"]),
    ("tensors_overlap", lambda g: setattr(g.tensor("blk.0.ffn_norm.weight"), "offset",
                                          g.tensor("blk.0.attn_norm.weight").offset), ["'blk.0.ffn_norm.weight'"]),
    ("duplicate_tensor", lambda g: setattr(g.tensor("blk.0.ffn_norm.weight"), "name", "blk.0.attn_norm.weight"),
     ["'blk.0.attn_norm.weight'"]),
    ("tensor_type_id_99", lambda g: setattr(g.tensor("blk.0.attn_v.weight"), "ttype", 99), ["'blk.0.attn_v.weight'"]),
    ("tensor_type_q8_1", lambda g: setattr(g.tensor("blk.0.attn_v.weight"), "ttype", Q8_1), ["'blk.0.attn_v.weight'"]),
    ("tensor_row_not_whole_blocks", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "dims", [48, 64]),
     ["'blk.0.attn_q.weight'"]),
    ("tensor_shape_not_config", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "dims", [64, 32]),
     ["'blk.0.attn_q.weight'"]),
    ("embedding_1d", lambda g: setattr(g.tensor("token_embd.weight"), "dims", [64 * 261]), ["'token_embd.weight'"]),
    # -- model keys
    ("architecture_not_string", lambda g: g.set("general.architecture", U32, enc(U32, 1)), ["'general.architecture'"]),
    ("block_count_string", lambda g: g.set("llama.block_count", STR, enc(STR, "1")), ["'llama.block_count'"]),
    ("block_count_float", lambda g: g.set("llama.block_count", F32, enc(F32, 1.0)), ["'llama.block_count'"]),
    ("block_count_bool", lambda g: g.set("llama.block_count", BOOL, enc(BOOL, True)), ["'llama.block_count'"]),
    ("block_count_0", lambda g: g.set("llama.block_count", U32, enc(U32, 0)), ["'llama.block_count'"]),
    ("block_count_10^9", lambda g: g.set("llama.block_count", U32, enc(U32, 10**9)), ["'llama.block_count'"]),
    ("block_count_2^63", lambda g: g.set("llama.block_count", U64, enc(U64, 2**63)), ["'llama.block_count'"]),
    ("head_count_0", lambda g: g.set("llama.attention.head_count", U32, enc(U32, 0)), ["'llama.attention.head_count'"]),
    ("head_count_kv_0", lambda g: g.set("llama.attention.head_count_kv", U32, enc(U32, 0)),
     ["'llama.attention.head_count_kv'"]),
    ("head_count_kv_not_dividing", lambda g: g.set("llama.attention.head_count_kv", U32, enc(U32, 3)),
     ["'llama.attention.head_count_kv'"]),
    ("embedding_not_divisible_by_heads", lambda g: g.set("llama.embedding_length", U32, enc(U32, 66)),
     ["'llama.embedding_length'", "'llama.attention.head_count'"]),
    ("embedding_length_2^40", lambda g: g.set("llama.embedding_length", U64, enc(U64, 2**40)),
     ["'llama.embedding_length'"]),
    ("feed_forward_length_negative", lambda g: g.set("llama.feed_forward_length", I32, enc(I32, -1)),
     ["'llama.feed_forward_length'"]),
    ("key_length_2^31", lambda g: g.set("llama.attention.key_length", U32, enc(U32, 2**31)),
     ["'llama.attention.key_length'"]),
    ("context_length_0", lambda g: g.set("llama.context_length", U32, enc(U32, 0)), ["'llama.context_length'"]),
    ("context_length_2^40", lambda g: g.set("llama.context_length", U64, enc(U64, 2**40)), ["'llama.context_length'"]),
    ("rope_base_nan", lambda g: g.set("llama.rope.freq_base", F32, enc(F32, NAN)), ["'llama.rope.freq_base'"]),
    ("rope_base_negative", lambda g: g.set("llama.rope.freq_base", F32, enc(F32, -10000.0)), ["'llama.rope.freq_base'"]),
    ("rope_base_inf", lambda g: g.set("llama.rope.freq_base", F32, enc(F32, INF)), ["'llama.rope.freq_base'"]),
    ("rms_eps_nan", lambda g: g.set("llama.attention.layer_norm_rms_epsilon", F32, enc(F32, NAN)),
     ["'llama.attention.layer_norm_rms_epsilon'"]),
    ("rms_eps_negative", lambda g: g.set("llama.attention.layer_norm_rms_epsilon", F32, enc(F32, -1e-6)),
     ["'llama.attention.layer_norm_rms_epsilon'"]),
    ("rope_scaling_factor_nan", lambda g: (g.set("llama.rope.scaling.type", STR, enc(STR, "linear")),
                                           g.set("llama.rope.scaling.factor", F32, enc(F32, NAN)))[0],
     ["'llama.rope.scaling.factor'"]),
    # -- tokenizer
    ("tokens_more_than_embedding_rows", lambda g: _tokens_added(g, 5), ["'tokenizer.ggml.tokens'", "'token_embd.weight'"]),
    ("tokens_not_strings", lambda g: g.set("tokenizer.ggml.tokens", ARR, enc_array(U32, list(range(261)))),
     ["'tokenizer.ggml.tokens'"]),
    ("tokens_not_an_array", lambda g: g.set("tokenizer.ggml.tokens", STR, enc(STR, "hi")), ["'tokenizer.ggml.tokens'"]),
    ("token_type_strings", lambda g: g.set("tokenizer.ggml.token_type", ARR, enc_array(STR, ["1"] * 261)),
     ["'tokenizer.ggml.token_type'"]),
    ("merges_not_strings", lambda g: g.set("tokenizer.ggml.merges", ARR, enc_array(I32, [1, 2])),
     ["'tokenizer.ggml.merges'"]),
    ("merge_of_unknown_tokens", lambda g: g.set("tokenizer.ggml.merges", ARR, enc_array(STR, ["h i", "zz qq"])),
     ["'tokenizer.ggml.merges'"]),
    ("bos_token_id_string", lambda g: g.set("tokenizer.ggml.bos_token_id", STR, enc(STR, "0")),
     ["'tokenizer.ggml.bos_token_id'"]),
    ("bos_token_text_with_colon", lambda g: (_tokens_renamed(g, {0: "<|a:b|>"}),
                                             g.set("tokenizer.ggml.add_bos_token", BOOL, enc(BOOL, True)))[0],
     ["'tokenizer.ggml.bos_token_id'"]),
    ("spm_scores_strings", lambda g: (_spm(g, _spm_base_tokens()),
                                      g.set("tokenizer.ggml.scores", ARR, enc_array(STR, ["0"] * 261)))[0],
     ["'tokenizer.ggml.scores'"]),
    ("spm_token_of_200k_chars", lambda g: _spm(g, _spm_base_tokens()[:-1] + ["a" * 200_000]), ["'tokenizer.ggml.tokens'"]),
]


@pytest.mark.parametrize("case,edit,names", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_hostile_gguf(llama_gguf, tmp_path, case, edit, names):
    g = Gguf.read(llama_gguf)
    data = edit(g)
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data if isinstance(data, bytes) else g.to_bytes())
    r = run_cli(path)
    found = problems(r, [str(path), *names])
    assert not found, describe(r, found)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_gguf_path_that_is_not_a_file(tmp_path, kind):
    """A .gguf that is a named pipe (reading it would wait for a writer forever) or a link to /dev/zero."""
    path = tmp_path / f"{kind}.gguf"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    r = run_cli(path)
    found = problems(r, [str(path), "not a regular file"])
    assert not found, describe(r, found)


def test_gguf_base_file_generates_and_round_trips(llama_gguf, tmp_path):
    """The control: the file every case edits is fine (exit 0 within the bound), and the test's own parser writes it
    back byte for byte, so each case's file differs from a good one by its edit alone."""
    assert Gguf.read(llama_gguf).to_bytes() == llama_gguf.read_bytes()
    r = run_cli(llama_gguf)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.max_rss_mb < RSS_LIMIT_MB


# --------------------------------------------------------------------------- Hugging Face folders


def st_read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_write(path: Path, header: dict | None, data: bytes, raw_header: bytes | None = None,
             length: int | None = None) -> None:
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)


def hf_case_folder(src: Path, dst: Path, own: tuple[str, ...]) -> Path:
    """dst with links to src's files, but private copies of `own` (the files the case edits)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in own:
            shutil.copyfile(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def _config(**change) -> Callable[[Path], Path]:
    def edit(folder: Path) -> Path:
        cfg = folder / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **change}))
        return cfg

    return edit


def _header(change: Callable[[dict, bytes], tuple[dict | None, bytes] | dict | None], **write) -> Callable[[Path], Path]:
    """An edit of model.safetensors' header (and data): `change(header, data)` edits the header in place or returns
    a new (header, data)."""

    def edit(folder: Path) -> Path:
        st = folder / "model.safetensors"
        header, data = st_read(st)
        out = change(header, data)
        if isinstance(out, tuple):
            header, data = out
        st_write(st, header, data, **write)
        return st

    return edit


def _raw_header(raw: bytes | None = None, length: Callable[[int], int] | None = None) -> Callable[[Path], Path]:
    """model.safetensors with its header's bytes replaced by `raw`, or its length field by `length(file size)`."""

    def edit(folder: Path) -> Path:
        st = folder / "model.safetensors"
        header, data = st_read(st)
        st_write(st, header, data, raw_header=raw)
        if length is not None:
            st_write(st, header, data, raw_header=raw, length=length(st.stat().st_size))
        return st

    return edit


WTE = "transformer.wte.weight"  # stored last in the fixture's file (tensors are stored by name)
WPE = "transformer.wpe.weight"


def _tiny_tensors(n: int) -> Callable[[dict, bytes], None]:
    def change(h: dict, d: bytes) -> None:
        h.update({f"extra.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [len(d), len(d)]} for i in range(n)})

    return change


def _info(name: str, **change) -> Callable[[dict, bytes], None]:
    return lambda h, d: h[name].update(change)


def _index(weight_map: Callable[[list[str]], object], shard_name: str = "model-00001-of-00001.safetensors",
           raw: str | None = None) -> Callable[[Path], Path]:
    """The folder as a sharded checkpoint: model.safetensors renamed to one shard, an index naming it."""

    def edit(folder: Path) -> Path:
        st = folder / "model.safetensors"
        header, _ = st_read(st)
        st.rename(folder / shard_name)
        index = folder / "model.safetensors.index.json"
        names = [k for k in header if k != "__metadata__"]
        index.write_text(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map(names)}))
        return index

    return edit


# (case id, edit of the folder returning the file the message must name - the folder, for a tensor missing from
#  all its files -, what else it must name)
HF_CASES: list[tuple[str, Callable[[Path], Path], list[str]]] = [
    # -- config.json
    ("n_ctx_2^40", _config(n_ctx=2**40), ["n_ctx"]),
    ("n_positions_2^40", _config(n_positions=2**40), ["n_positions"]),
    ("n_layer_10^9", _config(n_layer=10**9), ["n_layer"]),
    ("n_embd_not_divisible_by_n_head", _config(n_embd=66), ["n_embd", "n_head"]),
    ("n_head_0", _config(n_head=0), ["n_head"]),
    ("vocab_size_string", _config(vocab_size="50257"), ["vocab_size"]),
    ("layer_norm_epsilon_nan", _config(layer_norm_epsilon=NAN), ["layer_norm_epsilon"]),
    ("eos_token_id_2^40", _config(eos_token_id=2**40), ["eos_token_id"]),
    ("model_type_unknown", _config(model_type="gpt3"), ["model_type"]),
    ("config_not_an_object", lambda f: (f / "config.json").write_text("[1]") and f / "config.json", []),
    ("config_nested_10^5_deep", lambda f: (f / "config.json").write_text("[" * 100_000) and f / "config.json", []),
    # -- model.safetensors: the header
    ("header_length_2^40", _raw_header(length=lambda size: 2**40), ["header"]),
    ("header_length_past_file", _raw_header(length=lambda size: size + 1), ["header"]),
    ("header_length_2^64-1", _raw_header(length=lambda size: 2**64 - 1), ["header"]),
    ("header_not_json", _raw_header(raw=b"{not json at all}"), ["header"]),
    ("header_not_utf8", _raw_header(raw=b'{"\xff\xfe": 1}'), ["header"]),
    ("header_not_an_object", _raw_header(raw=b"[1, 2, 3]"), ["header"]),
    ("header_nested_10^5_deep", _raw_header(raw=b"[" * 100_000), ["header"]),
    ("header_over_8MiB", _raw_header(raw=b"{" + b" " * (8 << 20) + b"}"), ["header"]),
    ("metadata_not_strings", _header(lambda h, d: h.update({"__metadata__": {"format": 5}})), ["__metadata__"]),
    # -- model.safetensors: one tensor's entry
    ("tensor_entry_not_an_object", _header(lambda h, d: h.update({WPE: [1, 2]})), [f"'{WPE}'"]),
    ("dtype_unknown", _header(_info(WPE, dtype="F99")), [f"'{WPE}'", "F99"]),
    ("dtype_float8", _header(lambda h, d: h[WPE].update(
        dtype="F8_E4M3", shape=[h[WPE]["shape"][0], 4 * h[WPE]["shape"][1]])), [f"'{WPE}'"]),
    ("shape_not_matching_bytes", _header(_info(WPE, shape=[1024, 32])), [f"'{WPE}'"]),
    ("shape_negative", _header(_info(WPE, shape=[-1024, -64])), [f"'{WPE}'"]),
    ("shape_product_overflows", _header(_info(WPE, shape=[2**40, 2**40])), [f"'{WPE}'"]),
    ("shape_not_a_list", _header(_info(WPE, shape="1024x64")), [f"'{WPE}'"]),
    ("data_offsets_missing", _header(lambda h, d: h[WPE].pop("data_offsets")), [f"'{WPE}'"]),
    ("data_offsets_past_end", _header(lambda h, d: h[WTE]["data_offsets"].__setitem__(1, len(d) + 10**6)), [f"'{WTE}'"]),
    ("data_offsets_2^64", _header(_info(WPE, data_offsets=[2**64, 2**64 + 4])), [f"'{WPE}'"]),
    ("data_offsets_reversed", _header(lambda h, d: h[WPE].update(data_offsets=h[WPE]["data_offsets"][::-1])),
     [f"'{WPE}'"]),
    ("data_offsets_overlap", _header(lambda h, d: h["transformer.ln_f.bias"].update(
        data_offsets=h["transformer.ln_f.weight"]["data_offsets"])), ["'transformer.ln_f.bias'", "overlap"]),
    ("data_truncated", _header(lambda h, d: (h, d[: len(d) // 2])), [f"'{WTE}'"]),  # stored last, 95% of the data
    ("data_trailing_bytes", _header(lambda h, d: (h, d + b"\0" * 64)), ["64 bytes after", f"'{WTE}'"]),
    # 50,000 empty tensors (a 3.5 MB header), then a config asking for a layer the file lacks: the loader reads the
    # whole file before it compares names, and used to open (and parse the header of) the file once per tensor
    ("50k_tiny_tensors_then_a_missing_one", lambda f: (_header(_tiny_tensors(50_000))(f), _config(n_layer=3)(f), f)[-1],
     ["'h.2.ln_1.weight'"]),
    # -- sharded checkpoints
    ("index_not_json", _index(None, raw="{"), ["model.safetensors.index.json"]),
    ("index_weight_map_not_an_object", _index(lambda names: ["model-00001-of-00001.safetensors"]), ["weight_map"]),
    ("index_shard_name_not_a_string", _index(lambda names: {n: 7 for n in names}), ["weight_map"]),
    ("index_shard_outside_folder", _index(lambda names: {n: "../model-00001-of-00001.safetensors" for n in names}),
     ["weight_map"]),
    ("index_shard_absolute_path", _index(lambda names: {n: "/etc/hostname" for n in names}), ["weight_map"]),
]


@pytest.mark.parametrize("case,edit,names", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hostile_hf_folder(gpt2_small, tmp_path, case, edit, names):
    folder = hf_case_folder(gpt2_small, tmp_path / case, own=("config.json", "model.safetensors"))
    named_file = edit(folder)
    r = run_cli(folder)
    found = problems(r, [str(named_file), *names])
    assert not found, describe(r, found)


def test_hf_base_folder_generates(gpt2_small, tmp_path):
    folder = hf_case_folder(gpt2_small, tmp_path / "m", own=("config.json", "model.safetensors"))
    r = run_cli(folder)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.max_rss_mb < RSS_LIMIT_MB


# --------------------------------------------------------------------------- negative controls: the harness can fail


def _python(code: str) -> Run:
    return run_child(["-c", code])


def test_harness_catches_a_traceback(llama_gguf):
    """A loader bug that escapes as a traceback: the real CLI on the good file, with GGUFFile.open replaced by one
    that raises the IndexError gguf-py's reader raises on a short read."""
    r = _python("import sys, llorch_cpud.formats.gguf as g\n"
                "def boom(path): raise IndexError('index 0 is out of bounds for axis 0 with size 0')\n"
                "g.GGUFFile.open = boom\n"
                "from llorch_cpud.cli import main\n"
                f"sys.exit(main(['generate', '--model', {str(llama_gguf)!r}, 'hi']))")
    assert "a traceback on stderr" in problems(r, [])
    assert any(p.startswith("stderr is") for p in problems(r, []))


def test_harness_catches_a_multi_line_error_and_a_missing_name():
    r = _python("import sys; print('error: model.gguf: bad tensor\\n  while reading blk.0', file=sys.stderr); sys.exit(2)")
    found = problems(r, ["model.gguf", "'blk.0.attn_q.weight'"])
    assert "stderr is 2 lines, not one" in found and "does not name \"'blk.0.attn_q.weight'\"" in found


def test_harness_catches_success_and_memory():
    r = _python(f"import numpy as np; a = np.ones({RSS_LIMIT_MB + 64} << 20, np.uint8); print(int(a.sum()))")
    found = problems(r, [])
    assert "exit status 0: the file was accepted" in found
    assert any(p.startswith("peak RSS") for p in found), (found, r.max_rss_mb)
