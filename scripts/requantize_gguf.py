"""Write another GGUF type of a model with llama.cpp's own quantizer (through llama-cpp-python), for
measuring the loaders and kernels on types the default model does not use (F16, Q4_K_M, Q5_0, ...).

    /path/to/venv-with-llama-cpp/bin/python scripts/requantize_gguf.py SRC.gguf OUT.gguf F16|Q4_K_M|Q8_0|...

From a quantized source the values are quantized twice (llama.cpp's `allow_requantize`): fine for
speed and loader checks, not a model to judge quality by. The type names are llama.cpp's
LLAMA_FTYPE_MOSTLY_<NAME>. Needs llama-cpp-python (not a project dependency; see README).
"""

from __future__ import annotations

import ctypes
import sys


def requantize(src: str, dst: str, ftype: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    try:
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    except AttributeError:
        raise SystemExit(f"unknown type {ftype!r} (llama_cpp has no LLAMA_FTYPE_MOSTLY_{ftype.upper()})") from None
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    requantize(*sys.argv[1:])
