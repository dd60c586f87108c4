"""ZipAR: parallel decoding of autoregressive image models by spatial locality (He et al., arXiv 2412.04062).

`zipjax.generate_image(model, prompt, zipar_window=s)` decodes with it; `schedule.fixed_window` is the plan,
`cache.ScatterKVCache` the cache it writes out of order, `decode` the jitted loop.
"""

from zipjax.zipar.schedule import Schedule, fixed_window, passes

__all__ = ["Schedule", "fixed_window", "passes"]
