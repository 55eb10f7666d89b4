"""Build of the C extension (the kernels); everything else is in pyproject.toml.

The kernel sources (llorch_cpud/kernels/c/, one translation unit: module.c) are compiled once per instruction-set
level of this machine's architecture (llorch_cpud/kernels/isa.py VARIANTS: on x86-64 `generic` -march=x86-64,
`avx2` -march=x86-64-v3, `avx512` -march=x86-64-v4 + VNNI; on aarch64 `generic` armv8-a and `dotprod`
armv8.2-a+dotprod+fp16), each into llorch_cpud.kernels._qkernels_<variant>; at import the package takes the best
one the CPU runs. So an install (or a wheel) runs on any CPU of its architecture. The variants compile in
parallel (one per core).

    LLORCH_VARIANTS=generic,avx2   build only these

Every extension is optional: without a C compiler the package still installs and models run on the numpy path
(slower; `llorch-cpud info` and `generate` say so)."""

import copy
import os
import sys
import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("llorch_isa", ROOT / "llorch_cpud" / "kernels" / "isa.py")
isa = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = isa  # (dataclasses look their module up)
spec.loader.exec_module(isa)

SOURCES = ["llorch_cpud/kernels/c/module.c"]
DEPENDS = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "llorch_cpud" / "kernels" / "c").glob("*.[ch]"))]
COMMON = ["-O3", "-fopenmp", "-std=gnu11", "-Wno-psabi"]


def extension(name, flags):
    return Extension(f"llorch_cpud.kernels._qkernels_{name}", sources=SOURCES, depends=DEPENDS,
                     extra_compile_args=[*COMMON, *flags], extra_link_args=["-fopenmp"],
                     define_macros=[("LLORCH_MODULE", f"_qkernels_{name}")], optional=True)


wanted = [v for v in os.environ.get("LLORCH_VARIANTS", "").split(",") if v]
exts = [extension(v.name, v.flags) for v in isa.variants_for() if not wanted or v.name in wanted]


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extension(self, ext):
        # each variant compiles the same module.c: its own temporary folder, or parallel builds share one .o
        me = copy.copy(self)
        me.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[-1])
        return build_ext.build_extension(me, ext)


setup(ext_modules=exts, cmdclass={"build_ext": BuildExt})
