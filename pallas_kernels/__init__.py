"""Pallas kernels, installed as `zipjax.kernels`, each beside a plain jax.numpy reference it is tested against.

common               the leaf the kernels and the library share: mask value, grouped scores / softmax, slot
                     visibility, packed-code layout (imports jax only)
quantized_attention  decode attention over packed 2/4/8-bit KV codes, partial states merged by log-sum-exp
zipar_attention      ZipAR's parallel-decoding attention (several queries per sequence, written-slot raster mask)
delta_matmul         ME-Switch's grouped dequantize-matmul: each row times its own expert's packed low-bit delta

Kernel modules import jax and `zipjax.kernels.common` only, so each imports alone.
"""
