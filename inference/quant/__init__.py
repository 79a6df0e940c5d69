"""Weight quantization for the engine: block-wise FP8 (e4m3, one scale per 128x128 block)."""

from .fp8 import FP8_BLOCK, Fp8Linear, dequantize_blockwise, quantize_blockwise, quantize_linears

__all__ = ["FP8_BLOCK", "Fp8Linear", "dequantize_blockwise", "quantize_blockwise", "quantize_linears"]
