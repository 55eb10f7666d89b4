"""The KV cache's memory: zeros from the OS in small pages (cache.zeroed), so that a long sequence's first step
does not fault in and zero its whole cache at once (with numpy's own allocation, which asks for transparent huge
pages, the first chunk of an 8k prompt stalled every decoding stream ~0.5 s on a machine with THP defrag)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llorch_cpud.cache import KVCache, cache_read, cache_write


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def first_chunk_growth(k: np.ndarray) -> float:
    """RSS growth (MB) from writing 8 positions of every layer's and head's slab (a first prefill chunk)."""
    before = rss_mb()
    k[:, :, :8, :] = 1.0
    return rss_mb() - before


def test_cache_is_zero_writable_and_sized():
    for dtype in (np.float32, np.float16):
        c = KVCache.allocate(3, 2, 50, 16, dtype)
        assert c.k.shape == c.v.shape == (3, 2, 50, 16) and c.k.dtype == dtype and c.max_seq == 50
        assert c.nbytes == 2 * 3 * 2 * 50 * 16 * np.dtype(dtype).itemsize
        assert not c.k.any() and not c.v.any()
        k = np.arange(2 * 2 * 16, dtype=np.float32).reshape(2, 2, 16)
        cache_write(c, 1, 7, k, -k)
        got_k, got_v = cache_read(c, 1, 9)
        assert np.array_equal(got_k[:, 7:9], k.transpose(1, 0, 2).astype(dtype))
        assert np.array_equal(got_v[:, 7:9], -k.transpose(1, 0, 2).astype(dtype))
    with pytest.raises(IndexError, match="overflow"):
        cache_write(c, 0, 49, k, k)
    assert KVCache.allocate(1, 1, 0, 4).nbytes == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc")
def test_a_first_chunk_faults_in_only_the_pages_it_writes():
    """A fresh 8k-position cache (SmolLM2's shape): the first chunk's writes bring in about the pages they touch
    (30 layers x 3 heads x a 4 KB page = 0.35 MB), not the whole cache (184 MB). Negative control: numpy's own
    zeros of that shape, which numpy marks for transparent huge pages, take a 2 MB page per slab where THP is on."""
    shape = (30, 3, 8192, 64)
    c = KVCache.allocate(*shape)
    assert first_chunk_growth(c.k) < 8
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if mode.exists() and "[never]" not in mode.read_text():
        assert first_chunk_growth(np.zeros(shape, np.float32)) > 100
