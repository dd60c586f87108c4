"""ZipAR: parallel decoding of autoregressive image models by spatial locality (He et al., arXiv 2412.04062), and
its training-free peer Speculative Jacobi Decoding (Teng et al., ICLR 2025).

    zipjax.generate_image(model, prompt, decoder=zipar.FixedWindow(7))          # a row starts 7 tokens behind
    zipjax.generate_image(model, prompt, decoder=zipar.AdaptiveWindow(4))       # drafted early, verified
    zipjax.generate_image(model, prompt, decoder=zipar.SJD(16))                 # Jacobi drafts, verified

Each decoder is a frozen dataclass of its settings, validated when made, with `kernel: bool | None = None` (the
Pallas attention kernel on TPU/GPU, jax.numpy on CPU; zipjax.platform). `schedule.fixed_window` is the fixed
plan, `cache.ScatterKVCache` the cache every decoder here writes out of order.
"""

from zipjax.zipar.adaptive import AdaptiveWindow
from zipjax.zipar.fixed import FixedWindow
from zipjax.zipar.schedule import Schedule, fixed_window, passes
from zipjax.zipar.sjd import SJD

__all__ = ["SJD", "AdaptiveWindow", "FixedWindow", "Schedule", "fixed_window", "passes"]
