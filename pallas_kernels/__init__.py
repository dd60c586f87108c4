"""Pallas kernels for zipjax, each beside a plain jax.numpy reference it is tested against (interpret mode on CPU).

zipar_attention: ZipAR's parallel-decoding attention (several queries per sequence, written-slot raster mask, GQA).
"""
