"""kernels/isa.py: which kernel variant a CPU gets, from its flags alone (no build needed: the fast tier)."""

from __future__ import annotations

import pytest

from llorch_cpud.kernels import isa

# /proc/cpuinfo flags of real CPUs (the parts that matter)
SSE2_ONLY = {"fpu", "sse", "sse2", "lm"}  # a first-generation x86-64
NEHALEM = SSE2_ONLY | isa.X86_V2
HASWELL = NEHALEM | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
SANDY_BRIDGE = NEHALEM | {"avx", "xsave"}  # AVX but no AVX2/FMA
ZEN2 = HASWELL | {"sse4a", "sha_ni"}
SKYLAKE_X = HASWELL | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}  # AVX-512 without VNNI
ICE_LAKE = SKYLAKE_X | {"avx512_vnni", "avx512vbmi"}
GRAVITON2 = {"fp", "asimd", "crc32", "atomics", "fphp", "asimdhp", "asimddp", "cpuid"}
CORTEX_A72 = {"fp", "asimd", "crc32", "cpuid"}


@pytest.mark.parametrize("flags, machine, want", [
    (ICE_LAKE, "x86_64", "avx512"),
    (SKYLAKE_X, "x86_64", "avx2"),  # the AVX-512 build needs VNNI as well
    (ZEN2, "x86_64", "avx2"),
    (HASWELL, "AMD64", "avx2"),
    (HASWELL - {"f16c"}, "x86_64", "generic"),  # any missing feature of the level rules it out
    (SANDY_BRIDGE, "x86_64", "generic"),
    (NEHALEM, "x86_64", "generic"),
    (SSE2_ONLY, "x86_64", "generic"),
    (set(), "x86_64", "generic"),  # flags unknown
    ({"x86-64-v3"}, "x86_64", "avx2"),  # the generic build's cpuid probe (no /proc/cpuinfo)
    ({"x86-64-v2", "x86-64-v3", "x86-64-v4"}, "x86_64", "avx2"),  # ... v4 without VNNI
    ({"x86-64-v2", "x86-64-v3", "x86-64-v4", "avx512_vnni"}, "x86_64", "avx512"),
    (GRAVITON2, "aarch64", "dotprod"),
    (GRAVITON2, "arm64", "dotprod"),  # macOS' name
    (CORTEX_A72, "aarch64", "generic"),
    (ICE_LAKE, "riscv64", "generic"),  # an unknown machine: the one plain build
])
def test_best_variant_for_the_flags(flags, machine, want):
    assert isa.best(flags, machine).name == want
    assert isa.tier(flags, machine) == want


def test_only_built_variants_are_chosen():
    assert isa.best(ICE_LAKE, "x86_64", built=["avx2", "generic"]).name == "avx2"
    assert isa.best(ZEN2, "x86_64", built=["generic"]).name == "generic"
    assert isa.best(ZEN2, "x86_64", built=["avx512", "generic"]).name == "generic"


def test_each_machine_has_a_generic_variant_last():
    for machine in ("x86_64", "aarch64", "ppc64le"):
        vs = isa.variants_for(machine)
        assert vs[-1].name == "generic" and vs[-1].runs_on(set())
        assert len({v.name for v in vs}) == len(vs)


def _load_with(monkeypatch, **env):
    saved = dict(isa.STATE)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        return isa.load(), dict(isa.STATE)
    finally:
        isa.STATE.update(saved)


def test_forcing_a_variant_not_built_leaves_the_numpy_path_and_says_why(monkeypatch):
    mod, state = _load_with(monkeypatch, LLORCH_ISA="nosuch")
    assert mod is None and state["variant"] is None and "LLORCH_ISA=nosuch" in state["error"]


def test_forcing_a_variant_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(isa, "built", lambda: ["avx512", "avx2", "generic"])
    monkeypatch.setattr(isa, "cpu_features", lambda generic=None: set(ZEN2))
    monkeypatch.setattr(isa, "machine", lambda name=None: "x86_64")
    monkeypatch.setattr(isa, "_import", lambda name: f"module {name}")
    mod, state = _load_with(monkeypatch, LLORCH_ISA="avx512")
    assert mod is None and "lacks" in state["error"] and "avx512_vnni" in state["error"]
    mod, state = _load_with(monkeypatch, LLORCH_ISA="")
    assert mod == "module avx2" and state["variant"] == "avx2" and state["cpu_tier"] == "avx2"
    monkeypatch.setattr(isa, "cpu_features", lambda generic=None: set())  # nothing known of the CPU: baseline
    mod, state = _load_with(monkeypatch, LLORCH_ISA="")
    assert mod == "module generic" and state["variant"] == "generic"
