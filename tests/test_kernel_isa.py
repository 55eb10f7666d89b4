"""The kernels' ISA variants (kernels/isa.py), as pip built them in place: the baseline x86-64 build (SSE2 only)
and the x86-64-v3 one (AVX2, FMA, F16C) each run the kernel and decode-block tests, forced with LLORCH_ISA; the
binaries hold the instructions their level allows and no more (objdump), and `info` reports each. Whatever
machine CI runs on, the non-native branches are compiled and their results held to the same tests. The
AVX-512 variant is compiled too; it runs only on a CPU that has AVX-512 VNNI."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llorch_cpud.kernels import isa

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds"),
              pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")]

TESTS = Path(__file__).parent
ROOT = TESTS.parent
KERNEL_TESTS = ["test_kernels.py", "test_kernels_q8.py", "test_decode_block.py"]
VARIANTS = {  # variant: (features the build must have, features it must not)
    "generic": (set(), {"avx2", "fma", "f16c", "avx512f"}),
    "avx2": ({"avx2", "fma", "f16c"}, {"avx512f", "avx512bw", "avx512vnni"}),
}


def so_file(variant: str) -> Path:
    files = list((ROOT / "llorch_cpud" / "kernels").glob(f"_qkernels_{variant}.*so"))
    assert files, f"the {variant} kernels are not built in place (pip install -e . / python setup.py build_ext --inplace)"
    return files[0]


def run(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def disassembly(variant: str) -> str:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so_file(variant))], capture_output=True,
                          text=True, check=True).stdout


def test_every_x86_variant_is_built():
    assert isa.STATE["built"] == ["avx512", "avx2", "generic"], isa.STATE


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_info_reports_the_variant(variant):
    has, lacks = VARIANTS[variant]
    r = run("-m", "llorch_cpud.cli", "info", "--json", env={"LLORCH_ISA": variant})
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["built"] and info["enabled"] and info["tier"] == info["variant"] == variant, info
    assert has <= set(info["build_isa"]) and not lacks & set(info["build_isa"]), info
    assert info["decode_path"] == "fused" and info["openmp"] > 0
    assert info["variants_built"] == ["avx512", "avx2", "generic"]
    # a warning in one line exactly when this CPU runs a better variant than the one forced
    assert any("slower than it could be" in w for w in info["warnings"]) == (info["cpu_tier"] != variant), info


def test_info_without_override_takes_the_best_the_cpu_runs():
    r = run("-m", "llorch_cpud.cli", "info", "--json", env={"LLORCH_ISA": ""})
    info = json.loads(r.stdout)
    assert info["variant"] == info["cpu_tier"] == isa.tier(isa.cpu_features()), info
    assert not any("slower than it could be" in w for w in info["warnings"]), info


def test_binaries_hold_only_their_level():
    generic, avx2, avx512 = disassembly("generic"), disassembly("avx2"), disassembly("avx512")
    assert "%ymm" not in generic and "%zmm" not in generic  # baseline x86-64: no 256- or 512-bit register
    assert "%ymm" in avx2  # the AVX2 build does use 256-bit vectors
    assert "%zmm" not in avx2 and "%k1" not in avx2  # but no 512-bit register, no AVX-512 mask register
    assert "%zmm" in avx512  # the control: the check sees AVX-512 where it is (this build is not run here)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_tests_pass_on_the_variant(variant):
    r = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *[str(TESTS / t) for t in KERNEL_TESTS],
            env={"LLORCH_ISA": variant})
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"{variant}: {tail}"
    assert " passed" in r.stdout and " failed" not in r.stdout and "error" not in r.stdout.splitlines()[-1], tail


def test_cpuid_probe_agrees_with_cpuinfo():
    """The generic build's cpu_features() (cpuid: where /proc/cpuinfo is absent) picks what /proc/cpuinfo picks."""
    import importlib

    generic = importlib.import_module("llorch_cpud.kernels._qkernels_generic")
    cpuinfo = isa._cpuinfo_flags()
    if not cpuinfo:
        pytest.skip("no /proc/cpuinfo")
    assert isa.tier(set(generic.cpu_features())) == isa.tier(cpuinfo)
