"""Build qkernels.c into a copy of the package, for other instruction sets or with an injected fault.

    python scripts/build_kernels.py DEST [--march x86-64-v3] [--opt -O3] [--fault NAME]

The copy in DEST/llorch_cpud imports its own _qkernels (run Python with cwd DEST or PYTHONPATH=DEST);
`llorch-cpud info` run there says what it was built for. Used by tests/test_kernel_isa.py (the kernel tests on
a baseline x86-64 and an AVX2 build) and scripts/kernel_faults.py (negative controls)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "llorch_cpud" / "kernels" / "qkernels.c"


def build(dest: Path, march: str = "native", opt: str = "-O3", fault: str = "NONE") -> Path:
    """Copy the package into dest and compile its kernels with -march=`march` at `opt` (carrying `fault`, a
    bugs.KERNEL_FAULTS name, unless NONE); returns dest."""
    shutil.copytree(ROOT / "llorch_cpud", dest / "llorch_cpud", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = dest / "llorch_cpud" / "kernels" / ("_qkernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    define = [] if fault == "NONE" else [f"-DLLORCH_FAULT=FAULT_{fault}"]
    cmd = [os.environ.get("CC", "cc"), opt, "-fopenmp", "-std=gnu11", "-Wno-psabi", f"-march={march}", "-shared",
           "-fPIC", f"-I{sysconfig.get_paths()['include']}", *define, str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--march", default="native")
    ap.add_argument("--opt", default="-O3")
    ap.add_argument("--fault", default="NONE")
    a = ap.parse_args(argv)
    build(a.dest, a.march, a.opt, a.fault)
    print(a.dest / "llorch_cpud")
    return 0


if __name__ == "__main__":
    sys.exit(main())
