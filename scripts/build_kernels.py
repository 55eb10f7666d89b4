"""Build the C kernels (llorch_cpud/kernels/c/) as one variant into a copy of the package, e.g. with an injected fault.

    python scripts/build_kernels.py DEST [--variant avx2] [--opt -O3] [--fault NAME]

The copy in DEST/llorch_cpud holds that one variant, _qkernels_<variant> (compiled with its flags from
kernels/isa.py VARIANTS; default: the best one this CPU runs), and imports it (run Python with cwd DEST or
PYTHONPATH=DEST); `llorch-cpud info` run there says what it was built for. Used by scripts/kernel_faults.py
(negative controls). The ISA variants themselves are all built in place by pip / `setup.py build_ext --inplace`,
and tests/test_kernel_isa.py runs the kernel tests on each with LLORCH_ISA."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "llorch_cpud" / "kernels" / "c" / "module.c"


def _isa():
    spec = importlib.util.spec_from_file_location("llorch_isa", ROOT / "llorch_cpud" / "kernels" / "isa.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def best_variant() -> str:
    """The best variant this CPU runs."""
    isa = _isa()
    return isa.tier(isa.cpu_features())


def build(dest: Path, variant: str | None = None, opt: str = "-O3", fault: str = "NONE") -> Path:
    """Copy the package into dest and compile its kernels as `variant` (default: the best this CPU runs) at `opt`,
    carrying `fault` (a bugs.KERNEL_FAULTS name) unless NONE; returns dest."""
    isa = _isa()
    variant = variant or best_variant()
    flags = next(v.flags for v in isa.variants_for() if v.name == variant)
    shutil.copytree(ROOT / "llorch_cpud", dest / "llorch_cpud", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    name = f"_qkernels_{variant}"
    out = dest / "llorch_cpud" / "kernels" / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    define = [] if fault == "NONE" else [f"-DLLORCH_FAULT=FAULT_{fault}"]
    cmd = [os.environ.get("CC", "cc"), opt, "-fopenmp", "-std=gnu11", "-Wno-psabi", *flags, "-shared", "-fPIC",
           f"-DLLORCH_MODULE={name}", f"-I{sysconfig.get_paths()['include']}", *define, str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--variant", default=None, help="a kernels/isa.py variant (default: the best this CPU runs)")
    ap.add_argument("--opt", default="-O3")
    ap.add_argument("--fault", default="NONE")
    a = ap.parse_args(argv)
    build(a.dest, a.variant, a.opt, a.fault)
    print(a.dest / "llorch_cpud")
    return 0


if __name__ == "__main__":
    sys.exit(main())
