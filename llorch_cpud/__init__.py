"""llorch-cpud: a CPU inference worker that proves its own numerics."""

__version__ = "0.1.0"
