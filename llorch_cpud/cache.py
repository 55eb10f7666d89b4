"""Preallocated KV cache: one per sequence, written once per position, never reallocated.

Layout: k and v are [n_layer, n_kv_head, max_seq, head_dim] float32, so that the keys of
one head for positions [0, T) are one contiguous slab — the shape attention multiplies.
A model in the `q8` numerics keeps them as float16, as llama.cpp does (half the bytes a decode
step's attention reads); values are rounded to nearest even when written and widened exactly
when read.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np


def zeroed(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero array in memory mapped straight from the OS with small pages, faulted in 4 KB at a time as
    positions are written. numpy asks for transparent huge pages on large arrays, and where the kernel compacts
    memory to find them when a page is first written (THP defrag "madvise", common), a fresh 8k-position cache
    stalled its first prefill step ~0.5 s (SmolLM2: 30 layers x 2 MB per head and layer, all first written by
    that step), and every stream decoding beside it with it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    m = mmap.mmap(-1, nbytes)  # anonymous: the OS's zero pages, unmapped when the array is freed
    m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype).reshape(shape)


@dataclass
class KVCache:
    k: np.ndarray  # [n_layer, n_kv_head, max_seq, head_dim]
    v: np.ndarray  # [n_layer, n_kv_head, max_seq, head_dim]

    @classmethod
    def allocate(cls, n_layer: int, n_kv_head: int, max_seq: int, head_dim: int, dtype=np.float32) -> "KVCache":
        shape = (n_layer, n_kv_head, max_seq, head_dim)
        return cls(k=zeroed(shape, dtype), v=zeroed(shape, dtype))

    @property
    def max_seq(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def cache_write(cache: KVCache, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
    """Store k, v of positions [start, start + n) for one layer."""
    n = k.shape[0]  # k, v: [n, n_kv_head, head_dim]
    if start + n > cache.max_seq:
        raise IndexError(f"KV cache overflow: positions {start}..{start + n - 1} exceed max_seq {cache.max_seq}")
    cache.k[layer, :, start : start + n] = k.transpose(1, 0, 2)  # [n, kvh, hd] -> [kvh, n, hd]
    cache.v[layer, :, start : start + n] = v.transpose(1, 0, 2)  # [n, kvh, hd] -> [kvh, n, hd]


def cache_read(cache: KVCache, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of the keys and values of positions [0, end) for one layer: 2 × [n_kv_head, end, head_dim]."""
    return cache.k[layer, :, :end], cache.v[layer, :, :end]
