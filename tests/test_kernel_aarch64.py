"""The kernels on aarch64, from an x86-64 machine: cross-compiled (Debian's gcc-aarch64-linux-gnu) and run under
qemu-user. tests/c/kernel_driver.c runs every kernel family on fixed inputs and prints each output's bits; the
aarch64 build of the generic path (NEON through the vector extensions) must give the x86-64 baseline build's bits
exactly when neither contracts a*b+c into an FMA (-ffp-contract=off), and agree to float32 rounding with the
FMA it contracts by default (armv8-a and armv8.2-a+dotprod+fp16, the two aarch64 variants of kernels/isa.py).
The Python module itself (module.c) must compile for both. Skipped, with the reason, without the cross tools."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from llorch_cpud.kernels import isa

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "c" / "kernel_driver.c"
CROSS = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
FLAGS = ["-O2", "-std=gnu11", "-Wno-unknown-pragmas", "-Wno-psabi"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="compares with an x86-64 build"),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler"),
    pytest.mark.skipif(shutil.which(CROSS) is None or shutil.which(QEMU) is None,
                       reason=f"no aarch64 cross tools ({CROSS}, {QEMU}: apt-get install gcc-aarch64-linux-gnu qemu-user)"),
]

AARCH64 = {v.name: [f for f in v.flags] for v in isa.variants_for("aarch64")}


def outputs(text: str) -> dict[str, np.ndarray]:
    out = {}
    for line in text.splitlines():
        name, *bits = line.split()
        out[name] = np.array([int(b, 16) for b in bits], dtype=np.uint32).view(np.float32)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aarch64")
    builds = {  # name: (compiler, flags, runner)
        "x86-64": ("cc", ["-march=x86-64", "-ffp-contract=off"], []),
        "aarch64-nofma": (CROSS, [*AARCH64["generic"], "-ffp-contract=off", "-static"], [QEMU]),
        **{f"aarch64-{name}": (CROSS, [*flags, "-static"], [QEMU]) for name, flags in AARCH64.items()},
    }

    def one(item):
        name, (cc, flags, runner) = item
        exe = tmp / name
        subprocess.run([cc, *FLAGS, *flags, str(DRIVER), "-lm", "-o", str(exe)], check=True, capture_output=True)
        r = subprocess.run([*runner, str(exe)], check=True, capture_output=True, text=True, timeout=300)
        return name, outputs(r.stdout)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, builds.items()))


def test_every_kernel_ran(runs):
    ref = runs["x86-64"]
    assert {"q4_1/5", "q4_1_q8/5", "q8_0_q8/1", "f16/5", "attend/64/f16", "attend/24/f32", "rope"} <= set(ref)
    for name, out in runs.items():
        assert set(out) == set(ref), name
        assert all(np.isfinite(v).all() and v.size for v in out.values()), name


def test_aarch64_generic_path_is_bit_identical_without_fma(runs):
    ref, got = runs["x86-64"], runs["aarch64-nofma"]
    differ = [k for k in ref if not np.array_equal(ref[k].view(np.uint32), got[k].view(np.uint32))]
    assert not differ, f"aarch64 differs from x86-64 in {differ}"
    # the control: the same source with the FMAs GCC contracts on aarch64 does differ in last bits somewhere
    fma = runs["aarch64-generic"]
    assert any(not np.array_equal(ref[k].view(np.uint32), fma[k].view(np.uint32)) for k in ref)


@pytest.mark.parametrize("variant", list(AARCH64))
def test_aarch64_variant_agrees_to_rounding(runs, variant):
    ref, got = runs["x86-64"], runs[f"aarch64-{variant}"]
    for k in ref:
        scale = float(np.abs(ref[k]).max())
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5 * scale, err_msg=f"{variant}: {k}")


@pytest.mark.parametrize("variant", list(AARCH64))
def test_module_compiles_for_aarch64(variant, tmp_path):
    """module.c, the Python module (Python's x86-64 headers: the same layout on LP64 Linux), compiles for aarch64."""
    inc = sysconfig.get_paths()["include"]
    subprocess.run([CROSS, "-O1", "-fopenmp", "-std=gnu11", "-Wno-psabi", "-fPIC", *AARCH64[variant],
                    f"-DLLORCH_MODULE=_qkernels_{variant}", f"-I{inc}", "-c",
                    str(ROOT / "llorch_cpud" / "kernels" / "c" / "module.c"), "-o", str(tmp_path / "m.o")],
                   check=True, capture_output=True)
    syms = subprocess.run(["aarch64-linux-gnu-nm", str(tmp_path / "m.o")], capture_output=True, text=True).stdout
    assert f"PyInit__qkernels_{variant}" in syms
