"""The worker's memory budget (issue 15): bytes for the running requests' KV caches and one step's activations.

What a request takes: its KV cache, allocated when the scheduler admits the job (not while it waits) and
freed when it ends. `KVCache.nbytes` is 2 (k and v) × n_layer × n_kv_head × positions × head_dim × itemsize,
positions = prompt tokens + max_tokens: linear in the positions, so one position's bytes are those of the
model's own one-position cache (`model.new_cache(1).nbytes`, float32 or the q8 numerics' float16) and a
request's are exactly positions × that, the nbytes its cache will have (tests/test_server_budget.py).

What a step takes besides: its activations - the rows of the decoding requests and of the prompt chunks
going through the blocks, a prompt chunk's attention scores over its cache, the sampled rows' logits. They
live only during the step; an upper bound of them (`activation_bytes`, from the model's shape, --max-batch
and --prefill-tokens) is set aside from the budget once.

The rest holds caches. The scheduler admits a waiting job only while the running jobs' caches plus its own
fit (else it waits, counted as queued: --max-queue and its 503 apply as to a job waiting for a batch slot);
a request whose cache does not fit even alone is refused before any work: 400 naming `max_tokens`, or
`prompt` when the prompt alone is over.

Default: half of what the machine can give when the model has loaded - MemAvailable (/proc/meminfo), or
within a cgroup memory limit what the cgroup has left, whichever is less. `serve --memory-budget-mb N`.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from pathlib import Path

from llorch_cpud.errors import LlorchError
from llorch_cpud.server.schemas import field_error

MIB = 1 << 20
DEFAULT_FRACTION = 0.5
FLOAT_BYTES = 4


def mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_memory() -> tuple[int | None, str]:
    """(bytes the machine can still give this process, where the figure comes from), or (None, "")."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: the "0::/path" line of /proc/self/cgroup
        rel = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        group = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit, used = _read_int(group / "memory.max"), _read_int(group / "memory.current")
        if limit is not None and used is not None:
            found.append((max(0, limit - used), "the cgroup's memory.max less memory.current"))
    except (OSError, StopIteration):
        pass
    if not found:
        try:
            import psutil

            found.append((int(psutil.virtual_memory().available), "available memory"))
        except Exception:  # noqa: BLE001 - no figure at all: the caller says so
            pass
    return min(found) if found else (None, "")


def activation_bytes(model, max_batch: int, prefill_tokens: int) -> int:
    """An upper bound of the float32 temporaries of one step of `model`: at most max_batch decode rows and
    prefill_tokens prompt-chunk rows, a chunk attending over up to the whole context."""
    c = model.config
    n_head, head_dim = c.n_head, c.head_dim
    width = max(c.n_embd, n_head * head_dim)
    ffn = getattr(c, "n_ff", None) or getattr(c, "n_inner", None) or 4 * c.n_embd
    n_ctx, chunk = model.n_ctx, min(prefill_tokens, model.n_ctx)
    rows = max_batch + chunk
    per_row = 12 * width + 6 * ffn  # residual, norms, q/k/v, merged heads, projections; the FFN and its temporaries
    if model.path == "numpy":
        # a prompt chunk's scores, softmax and one more temporary [H, n, T]; its keys and values widened (a float16
        # cache) or expanded to the query heads [H, T, hd]
        attention = 3 * n_head * chunk * n_ctx + 2 * n_head * n_ctx * head_dim
    else:  # the C attention: per thread, the scores of a block of 8 rows' query heads over T (kernels attend_rows)
        attention = (os.cpu_count() or 1) * 8 * n_head * n_ctx
    logits = 3 * max_batch * model.vocab_size  # the sampled rows' logits (or the greedy screen's) and the sampler's copies
    return FLOAT_BYTES * (rows * per_row + attention + logits)


@dataclass(frozen=True)
class MemoryBudget:
    total: int  # bytes: the running requests' KV caches + one step's activations
    position_bytes: int  # KV cache bytes of one position
    activations: int  # bytes set aside for one step's activations
    n_ctx: int
    source: str  # where `total` comes from

    @classmethod
    def for_model(cls, model, *, budget_mb: float | None, max_batch: int, prefill_tokens: int,
                  available: tuple[int | None, str] | None = None) -> "MemoryBudget":
        """The budget for `model` (budget_mb None: DEFAULT_FRACTION of `available`, by default the machine's);
        LlorchError when it cannot hold one step and one request of two positions."""
        if budget_mb is not None:
            total, source = int(budget_mb * MIB), f"--memory-budget-mb {budget_mb:g}"
        else:
            avail, where = available if available is not None else available_memory()
            if avail is None:
                raise LlorchError("cannot tell how much memory this machine has (no /proc/meminfo); "
                                  "set serve --memory-budget-mb")
            total, source = int(avail * DEFAULT_FRACTION), f"{DEFAULT_FRACTION:.0%} of {where} ({mib(avail)} MiB)"
        b = cls(total=total, position_bytes=model.new_cache(1).nbytes,
                activations=activation_bytes(model, max_batch, prefill_tokens), n_ctx=model.n_ctx, source=source)
        if b.max_positions < 2:
            least = b.activations + b.cache_bytes(2)
            raise LlorchError(f"memory budget of {mib(total)} MiB ({source}) is too small for this model: one step's "
                              f"activations take up to {mib(b.activations)} MiB (--max-batch, --prefill-tokens) and a "
                              f"request's KV cache {b.position_bytes} bytes a position; at least {mib(least)} MiB")
        return b

    @property
    def cache_room(self) -> int:
        """Bytes for the KV caches of the running requests together."""
        return max(0, self.total - self.activations)

    @property
    def max_positions(self) -> int:
        """Prompt tokens + max_tokens of the largest request that fits alone."""
        return min(self.n_ctx, self.cache_room // self.position_bytes)

    def cache_bytes(self, positions: int) -> int:
        """KVCache.nbytes of a cache of `positions` positions (Model.new_cache caps them at the context)."""
        return self.position_bytes * min(positions, self.n_ctx)

    def errors(self, n_prompt: int, max_tokens: int, prompt) -> list[dict]:
        """The field errors of a request whose KV cache cannot fit even alone ([] when it fits)."""
        limit = self.max_positions
        if n_prompt + max_tokens <= limit:
            return []
        rule = (f"prompt tokens + max_tokens <= {limit}: one request's KV cache within the worker's memory budget "
                f"of {mib(self.total)} MiB (serve --memory-budget-mb)")
        room = (f"the worker's memory budget of {mib(self.total)} MiB ({self.source}) leaves {mib(self.cache_room)} MiB "
                f"for KV caches: {limit} positions for one request")
        if n_prompt >= limit:
            return [field_error("prompt", f"prompt is {n_prompt} tokens, and at least one must be left to generate; "
                                          f"{room}", prompt, rule)]
        need = n_prompt + max_tokens
        return [field_error("max_tokens", f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {need} positions "
                                          f"need a KV cache of {mib(self.cache_bytes(need))} MiB; {room}, at most "
                                          f"{limit - n_prompt} max_tokens for this prompt", max_tokens, rule)]

    def describe(self) -> dict:
        return {"memory_budget_bytes": self.total, "memory_budget_source": self.source,
                "activation_reserve_bytes": self.activations, "kv_cache_bytes_per_position": self.position_bytes,
                "max_request_positions": self.max_positions}


class TooLarge(Exception):
    """A job whose KV cache does not fit the memory budget even alone (the HTTP side refuses it first)."""
