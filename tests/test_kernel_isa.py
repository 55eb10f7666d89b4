"""The kernels on CPUs without AVX-512: qkernels.c compiled for baseline x86-64 (SSE2 only) and for x86-64-v3
(AVX2, FMA, F16C - no AVX-512 instruction in the binary), each into a copy of the package
(scripts/build_kernels.py), which then runs the kernel and decode-block tests against its own build. Whatever
machine CI runs on, the non-native branches are compiled and their results held to the same tests."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import build_kernels  # noqa: E402 (scripts/)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds"),
              pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")]

TESTS = Path(__file__).parent
KERNEL_TESTS = ["test_kernels.py", "test_kernels_q8.py", "test_decode_block.py"]
BUILDS = {  # -march: (the kernel tier info() must report, features the build must have, features it must not)
    "x86-64": ("generic", set(), {"avx2", "fma", "f16c", "avx512f"}),
    "x86-64-v3": ("avx2", {"avx2", "fma", "f16c"}, {"avx512f", "avx512bw", "avx512vnni"}),
}


@pytest.fixture(scope="module", params=list(BUILDS))
def build(request, tmp_path_factory):
    return request.param, build_kernels.build(tmp_path_factory.mktemp(f"isa-{request.param}"), request.param)


def in_build(dest: Path, *args, env=None, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=dest, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(dest), **(env or {})})


def test_build_reports_what_it_was_compiled_for(build):
    march, dest = build
    tier, has, lacks = BUILDS[march]
    r = in_build(dest, "-m", "llorch_cpud.cli", "info", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["built"] and info["enabled"] and info["tier"] == tier, info
    assert has <= set(info["build_isa"]) and not lacks & set(info["build_isa"]), info
    assert info["decode_path"] == "fused" and info["openmp"] > 0
    # a warning in one line exactly when this CPU has an instruction set the build left out
    left_out = {"avx2", "fma", "f16c", "avx512f"} & set(info["cpu_isa"]) - set(info["build_isa"])
    assert any("built without" in w for w in info["warnings"]) == bool(left_out), (left_out, info["warnings"])


def test_avx2_build_holds_no_avx512_instruction(build):
    march, dest = build
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    so = next((dest / "llorch_cpud" / "kernels").glob("_qkernels*.so"))
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                          check=True).stdout
    assert "%zmm" not in text and "%k1" not in text  # no 512-bit register, no AVX-512 mask register
    if march == "x86-64":
        assert "%ymm" not in text  # nor a 256-bit one (AVX)
    else:
        assert "%ymm" in text  # the control: the AVX2 build does use 256-bit vectors


def test_kernel_tests_pass_on_the_build(build):
    march, dest = build
    r = in_build(dest, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *[str(TESTS / t) for t in KERNEL_TESTS],
                 env={"LLORCH_KERNELS_BUILD": str(dest)})
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"-march={march}: {tail}"
    assert " passed" in r.stdout and " failed" not in r.stdout and "error" not in r.stdout.splitlines()[-1], tail
