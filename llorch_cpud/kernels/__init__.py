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
import platform

from llorch_cpud.kernels.ops import (KernelMatrix, as_dense, blas_single_thread, decode_attention, linear,
                                     linear_many, take_rows)
from llorch_cpud.kernels.packed import PackedMatrix
from llorch_cpud.kernels.quantized import QUANT_TYPES, QuantMatrix, _qkernels, available


def enabled() -> bool:
    """Whether loaders should hand weights to the C kernels (built, and not LLORCH_KERNELS=numpy)."""
    return available() and os.environ.get("LLORCH_KERNELS", "c") != "numpy"


def cpu_features() -> set[str]:
    """The instruction-set flags this CPU reports (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tier(isa) -> str:
    """The kernel variant a build's features select: which SIMD paths in qkernels.c are compiled in."""
    isa = set(isa)
    if "avx512f" in isa:
        return "avx512-vnni" if "avx512vnni" in isa else "avx512"
    if "avx2" in isa and "fma" in isa:
        return "avx2"
    return "generic"


def info() -> dict:
    """Which kernel path this process runs and why: the C build's instruction sets (fixed when pip compiled it,
    -march=native unless LLORCH_PORTABLE=1), the CPU's, and a one-line warning for each way it is slower than it
    could be."""
    cpu = cpu_features()
    out = {"cpu": cpu_name(), "cpu_isa": sorted(f for f in cpu if f in ISA_FLAGS), "built": _qkernels is not None,
           "enabled": enabled(), "build_isa": [], "tier": "numpy", "openmp": 0, "warnings": []}
    if _qkernels is None:
        out["warnings"].append("C kernels not built (pip found no C compiler with OpenMP): every model runs on the "
                               "numpy path, several times slower; install gcc (or clang with libomp) and reinstall")
        return out
    build = _qkernels.build_info()
    out.update(build_isa=build["isa"], tier=tier(build["isa"]), openmp=build["openmp"], fault=build["fault"])
    if not out["enabled"]:
        out["warnings"].append("C kernels disabled by LLORCH_KERNELS=numpy: every model runs on the numpy path")
    missing = [f for f in build["isa"] if cpu and CPUINFO_NAME.get(f, f) not in cpu]
    if missing:
        out["warnings"].append(f"the kernels were built for {', '.join(missing)}, which this CPU lacks: rebuild here "
                               f"(pip install --force-reinstall --no-deps .)")
    unused = [f for f in ("avx512f", "avx512vnni", "avx2", "fma", "f16c") if CPUINFO_NAME.get(f, f) in cpu
              and f not in build["isa"]]
    if unused:
        out["warnings"].append(f"this CPU has {', '.join(unused)} but the kernels were built without "
                               f"(LLORCH_PORTABLE=1?): rebuild without it for speed")
    if build["fault"]:
        out["warnings"].append(f"TEST BUILD with injected kernel fault {build['fault']}: results are wrong on purpose")
    return out


#: build_info()'s names (the compilers' macros) where /proc/cpuinfo spells them otherwise
CPUINFO_NAME = {"avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "neon": "asimd", "dotprod": "asimddp"}

#: The /proc/cpuinfo flags that matter to the kernels (shown by `llorch-cpud info`).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "asimd", "asimddp")

__all__ = ["QUANT_TYPES", "KernelMatrix", "PackedMatrix", "QuantMatrix", "as_dense", "available", "blas_single_thread",
           "cpu_features", "decode_attention", "enabled", "info", "linear", "linear_many", "take_rows"]
