"""Build of the one C extension (the quantized matrix kernels); everything else is in pyproject.toml.

The extension is optional: without a C compiler the package still installs and quantized models
run on float32 dequantized weights (slower, more memory; `llorch-cpud generate` says so)."""

import os

from setuptools import Extension, setup

# -march=native: the kernels are built on the machine that runs them (pip builds from source).
# LLORCH_PORTABLE=1 builds for baseline x86-64/arm64 instead (e.g. for a wheel to copy elsewhere).
arch = [] if os.environ.get("LLORCH_PORTABLE") else ["-march=native"]

setup(
    ext_modules=[
        Extension(
            "llorch_cpud.kernels._qkernels",
            sources=["llorch_cpud/kernels/qkernels.c"],
            extra_compile_args=["-O3", "-fopenmp", "-std=gnu11", "-Wno-psabi", *arch],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
