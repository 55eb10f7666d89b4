"""Argument types the command-line modules share (cli.py, server/cli.py, bench.py): argparse only.

Below every subcommand module, so that they need not import the top-level cli.py that registers them.
"""

from __future__ import annotations

import argparse


def ranged(kind, lo=None, hi=None, name=""):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name or 'value'} must be {kind.__name__}, got {text!r}") from None
        if (lo is not None and not v >= lo) or (hi is not None and not v <= hi):  # NaN is neither
            raise argparse.ArgumentTypeError(f"{name or 'value'} must be in [{lo}, {hi}], got {text}")
        return v

    return parse


NUMERICS_HELP = ("products on quantized (GGUF Q4_0/Q4_1/Q5_0/Q8_0) weights: float32 = float32 activations, the dequantized "
                 "model's numbers (default); q8 = activations quantized to 8 bits per 32-block and integer dot "
                 "products, as llama.cpp computes (faster; its own tolerances in validate)")


def add_numerics_argument(parser) -> None:
    parser.add_argument("--numerics", choices=("float32", "q8"), default="float32", help=NUMERICS_HELP)
