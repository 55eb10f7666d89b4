"""Which build of the C kernels this process runs: the variants setup.py compiles and the pick at import.

setup.py compiles the same sources (kernels/c/) once per instruction-set level of the machine it builds on,
into llorch_cpud.kernels._qkernels_<variant>; at import, `load()` takes the best variant whose instruction sets
this CPU has (/proc/cpuinfo on Linux, sysctl on macOS, else cpuid through the generic variant's
cpu_features()), so one install runs on any x86-64 or aarch64 and fast where it can.

    LLORCH_ISA=<variant>   use this variant (tests force one; an error if it is not built or the CPU lacks it)
    LLORCH_KERNELS=numpy   no C kernels at all (kernels.enabled() is False; handled in kernels/__init__.py)

Standard library only: setup.py loads this file (by path) for the variants' compiler flags.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from dataclasses import dataclass

#: x86-64 micro-architecture levels as /proc/cpuinfo spells their features (what -march=x86-64-vN lets GCC emit)
X86_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
X86_V3 = X86_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_V4 = X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class Variant:
    name: str  # the module is llorch_cpud.kernels._qkernels_<name>
    machine: str  # "x86_64", "aarch64" or "any"
    flags: tuple[str, ...]  # compiler flags
    requires: frozenset = frozenset()  # CPU features (cpuinfo spelling) it needs
    level: str | None = None  # or this pseudo-feature (cpu_features() of the generic build: "x86-64-v3") + extra
    extra: frozenset = frozenset()

    def runs_on(self, cpu: set[str]) -> bool:
        if self.level and self.level in cpu:
            return self.extra <= cpu
        return self.requires <= cpu


#: every variant, best first per machine; the generic one of each machine needs nothing beyond its baseline
VARIANTS = (
    # AVX-512 with VNNI (Ice Lake, Zen 4 and later): 16 lanes, vpdpbusd for the q8 numerics
    Variant("avx512", "x86_64", ("-march=x86-64-v4", "-mavx512vnni", "-mtune=generic"),
            X86_V4 | {"avx512_vnni"}, "x86-64-v4", frozenset({"avx512_vnni"})),
    # AVX2 + FMA + F16C (Haswell, Zen and later)
    Variant("avx2", "x86_64", ("-march=x86-64-v3", "-mtune=generic"), X86_V3, "x86-64-v3"),
    Variant("generic", "x86_64", ("-march=x86-64", "-mtune=generic")),
    # Armv8.2 with the dot product and float16 arithmetic (Graviton 2+, Apple M1+, Neoverse)
    Variant("dotprod", "aarch64", ("-march=armv8.2-a+dotprod+fp16",), frozenset({"asimd", "asimddp", "fphp", "asimdhp"})),
    Variant("generic", "aarch64", ("-march=armv8-a",)),
    Variant("generic", "any", ()),
)


def machine(name: str | None = None) -> str:
    m = (name or platform.machine()).lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def variants_for(mach: str | None = None) -> list[Variant]:
    """The variants built on (and chosen among for) a machine, best first."""
    mach = machine(mach)
    own = [v for v in VARIANTS if v.machine == mach]
    return own or [v for v in VARIANTS if v.machine == "any"]


def best(cpu: set[str], mach: str | None = None, built=None) -> Variant:
    """The best variant (of `built` names, default all) whose features `cpu` has; generic when none fits."""
    cands = [v for v in variants_for(mach) if built is None or v.name in built]
    for v in cands:
        if v.runs_on(set(cpu)):
            return v
    return cands[-1] if cands else variants_for(mach)[-1]


def tier(cpu: set[str], mach: str | None = None) -> str:
    """The best variant this CPU could run (whether or not it was built)."""
    return best(cpu, mach).name


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: macOS sysctl hw.optional.* -> the cpuinfo names
_SYSCTL = {"hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_FP16": "fphp asimdhp",
           "hw.optional.AdvSIMD": "asimd", "hw.optional.avx2_0": "avx2", "hw.optional.fma": "fma",
           "hw.optional.f16c": "f16c", "hw.optional.avx512f": "avx512f", "hw.optional.avx512bw": "avx512bw",
           "hw.optional.avx512vl": "avx512vl", "hw.optional.avx512dq": "avx512dq",
           "hw.optional.avx512cd": "avx512cd", "hw.optional.avx512vnni": "avx512_vnni"}


def _sysctl_flags() -> set[str]:
    if platform.system() != "Darwin":
        return set()
    out = set()
    for key, names in _SYSCTL.items():
        try:
            r = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return out
        if r.returncode == 0 and r.stdout.strip() == "1":
            out.update(names.split())
    return out


def cpu_features(generic=None) -> set[str]:
    """The CPU's instruction-set flags (cpuinfo spelling): /proc/cpuinfo, else sysctl (macOS), else the generic
    build's cpuid probe (`generic`: that module, if imported); empty when none answers."""
    flags = _cpuinfo_flags() or _sysctl_flags()
    if not flags and generic is not None and hasattr(generic, "cpu_features"):
        flags = set(generic.cpu_features())
    return flags


def _import(name: str):
    try:
        return importlib.import_module(f"llorch_cpud.kernels._qkernels_{name}")
    except ImportError:
        return None


def built() -> list[str]:
    """The variants of this machine that were compiled (their modules exist), best first."""
    from importlib.util import find_spec

    out = []
    for v in variants_for():
        try:
            if find_spec(f"llorch_cpud.kernels._qkernels_{v.name}") is not None:
                out.append(v.name)
        except (ImportError, ValueError):
            pass
    return out


#: what load() chose and why (kernels.info() reports it)
STATE: dict = {"variant": None, "built": [], "cpu_tier": None, "forced": None, "error": None}


def load():
    """Import the best built variant this CPU runs (or LLORCH_ISA's); None when no variant was built or it
    fails to import. Records the choice in STATE."""
    names = built()
    forced = os.environ.get("LLORCH_ISA") or None
    STATE.update(built=names, forced=forced, variant=None, error=None)
    generic = _import("generic") if "generic" in names else None
    cpu = cpu_features(generic)
    STATE["cpu_tier"] = tier(cpu)
    if forced:  # a variant that cannot run here leaves the numpy path, and says why (kernels.info())
        if forced not in names:
            STATE["error"] = f"LLORCH_ISA={forced}: no such kernel variant built here (built: {', '.join(names) or 'none'})"
            return None
        v = next(v for v in variants_for() if v.name == forced)
        if cpu and not v.runs_on(cpu):
            STATE["error"] = f"LLORCH_ISA={forced}: this CPU lacks {', '.join(sorted(v.requires - cpu))}"
            return None
        choice = forced
    elif not names:
        return None
    elif not cpu:
        choice = names[-1] if "generic" in names else None  # nothing known of the CPU: the baseline build only
        if choice is None:
            return None
    else:
        choice = best(cpu, built=names).name
        if not next(v for v in variants_for() if v.name == choice).runs_on(cpu) and "generic" not in names:
            return None  # not even a baseline build: the numpy path
    mod = generic if choice == "generic" and generic is not None else _import(choice)
    if mod is None:
        STATE["error"] = f"the {choice} kernels failed to import"
        return None
    STATE["variant"] = choice
    return mod
