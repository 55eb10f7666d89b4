"""Compute kernels the model math calls when plain numpy is not the fastest way (quantized weights)."""

from llorch_cpud.kernels.quantized import QUANT_TYPES, QuantMatrix, as_dense, linear, linear_many, take_rows

__all__ = ["QUANT_TYPES", "QuantMatrix", "as_dense", "linear", "linear_many", "take_rows"]
