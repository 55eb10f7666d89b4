"""Compute kernels the model math calls where plain numpy is not the fastest way.

quantized.py  QuantMatrix: ggml Q4_1 / Q8_0 weights kept as stored, products on the blocks
packed.py     PackedMatrix: float32 weights row-interleaved for the same kind of kernel
screen.py     HeadScreen: a greedy step's exact argmax from a float16 copy of a float32 head
ops.py        linear / linear_many / take_rows / as_dense for any weight; batched decode attention
qkernels.c    the C (SIMD + OpenMP) behind them, built by pip at install (setup.py)

`available()` is False when the C extension could not be built; loaders then keep plain numpy
arrays (also with LLORCH_KERNELS=numpy), and every function here works on those too.
"""

import os

from llorch_cpud.kernels.ops import (KernelMatrix, as_dense, blas_single_thread, decode_attention, linear,
                                     linear_many, take_rows)
from llorch_cpud.kernels.packed import PackedMatrix
from llorch_cpud.kernels.quantized import QUANT_TYPES, QuantMatrix, available


def enabled() -> bool:
    """Whether loaders should hand weights to the C kernels (built, and not LLORCH_KERNELS=numpy)."""
    return available() and os.environ.get("LLORCH_KERNELS", "c") != "numpy"


__all__ = ["QUANT_TYPES", "KernelMatrix", "PackedMatrix", "QuantMatrix", "as_dense", "available", "blas_single_thread",
           "decode_attention", "enabled", "linear", "linear_many", "take_rows"]
