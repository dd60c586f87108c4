"""Deprecated alias of zipjax.harness.finetune (the README named `from zipjax.experts.finetune import load_experts`);
kept for one release, it warns once when imported. The fine-tuning loop is harness code, not library."""

import warnings

from zipjax.harness.finetune import (
    DELTA_FORMAT,
    DELTA_VERSION,
    MANIFEST,
    check_base,
    delta_arrays,
    finetune,
    hidden_and_logits,
    load_experts,
    perplexity,
    read_manifest,
    save_deltas,
    token_nll,
    window_nll,
)

warnings.warn("zipjax.experts.finetune moved to zipjax.harness.finetune; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)

__all__ = ["DELTA_FORMAT", "DELTA_VERSION", "MANIFEST", "check_base", "delta_arrays", "finetune", "hidden_and_logits",
           "load_experts", "perplexity", "read_manifest", "save_deltas", "token_nll", "window_nll"]
