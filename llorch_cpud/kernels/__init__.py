"""Compute kernels the model math calls where plain numpy is not the fastest way.

quantized.py  QuantMatrix: ggml Q4_1 / Q8_0 weights kept as stored, products on the blocks
packed.py     PackedMatrix: float32 weights row-interleaved for the same kind of kernel
screen.py     HeadScreen: a greedy step's exact argmax from a float16 copy of a float32 head
ops.py        linear / linear_many / take_rows / as_dense for any weight; batched decode attention
c/            the C (SIMD + OpenMP) behind them, built by pip at install once per ISA level (setup.py)
isa.py        which of those builds (_qkernels_generic / _avx2 / _avx512 ...) this CPU runs, picked at import

`available()` is False when the C extension could not be built; loaders then keep plain numpy
arrays (also with LLORCH_KERNELS=numpy), and every function here works on those too.
"""

import os
import platform

from llorch_cpud.kernels import isa
from llorch_cpud.kernels.ops import (KernelMatrix, as_dense, blas_single_thread, decode_attention, linear,
                                     linear_many, take_rows)
from llorch_cpud.kernels.packed import PackedMatrix
from llorch_cpud.kernels.quantized import QUANT_TYPES, QuantMatrix, _qkernels, available


def enabled() -> bool:
    """Whether loaders should hand weights to the C kernels (built, and not LLORCH_KERNELS=numpy)."""
    return available() and os.environ.get("LLORCH_KERNELS", "c") != "numpy"


def cpu_features() -> set[str]:
    """The instruction-set flags this CPU reports (/proc/cpuinfo spelling; empty where they cannot be read)."""
    return isa.cpu_features(_qkernels)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> dict:
    """Which kernel path this process runs and why: the variant chosen at import (kernels/isa.py: the best built
    one this CPU runs, or LLORCH_ISA's), the variants built, the best this CPU could run (`cpu_tier`), the chosen
    build's instruction sets and OpenMP, and a one-line warning for each way it is slower than it could be."""
    cpu = cpu_features()
    out = {"cpu": cpu_name(), "cpu_isa": sorted(f for f in cpu if f in ISA_FLAGS), "built": _qkernels is not None,
           "enabled": enabled(), "variant": isa.STATE["variant"], "variants_built": isa.STATE["built"],
           "cpu_tier": isa.STATE["cpu_tier"], "build_isa": [], "tier": "numpy", "openmp": 0, "warnings": []}
    if isa.STATE["error"]:
        out["warnings"].append(f"{isa.STATE['error']}: every model runs on the numpy path")
    if _qkernels is None:
        if not isa.STATE["error"]:
            out["warnings"].append("C kernels not built (pip found no C compiler with OpenMP): every model runs on the "
                                   "numpy path, several times slower; install gcc (or clang with libomp) and reinstall")
        return out
    build = _qkernels.build_info()
    out.update(build_isa=build["isa"], tier=isa.STATE["variant"], openmp=build["openmp"], fault=build["fault"])
    if not out["enabled"]:
        out["warnings"].append("C kernels disabled by LLORCH_KERNELS=numpy: every model runs on the numpy path")
    better = [v.name for v in isa.variants_for() if v.runs_on(cpu)]
    if better and better[0] != out["tier"]:
        why = (f"LLORCH_ISA={isa.STATE['forced']}" if isa.STATE["forced"] else
               "not built here: the compiler lacks its flags?" if better[0] not in out["variants_built"] else "?")
        out["warnings"].append(f"this CPU runs the {better[0]} kernels but uses {out['tier']} ({why}): "
                               f"slower than it could be")
    if build["fault"]:
        out["warnings"].append(f"TEST BUILD with injected kernel fault {build['fault']}: results are wrong on purpose")
    return out


#: The /proc/cpuinfo flags that matter to the kernels (shown by `llorch-cpud info`).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "asimd",
             "asimddp", "fphp", "x86-64-v2", "x86-64-v3", "x86-64-v4")

__all__ = ["QUANT_TYPES", "KernelMatrix", "PackedMatrix", "QuantMatrix", "as_dense", "available", "blas_single_thread",
           "cpu_features", "decode_attention", "enabled", "info", "isa", "linear", "linear_many", "take_rows"]
