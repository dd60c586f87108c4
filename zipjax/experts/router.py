"""A model-level router for expert="auto": which expert should serve a prompt, from the base model's own view of it.

ME-Switch turns expert selection into domain classification but does not say with what; zipjax's choice is the
cheapest classifier on what the model already computes: the base model's final-norm hidden states, mean-pooled over the
prompt's real tokens, standardized, and a linear softmax head (one class per expert, no "base" class). Classifying
costs one extra forward of the base over the prompt (perplexity routing costs one per expert). Training the head and
comparing it with other routings is harness work: zipjax.harness.router_training.

Saved as ``router.npz`` (arrays) and ``router.json`` (names, base fingerprint, training record) in a folder, by
default the expert bank's folder; loading with a base checks its fingerprint. Loading reads the manifest through
zipjax.validate (types, one-line errors) and exactly the four arrays, each checked from its npy header before its data
is read (never a pickle or an object array), then their values (finite, std > 0).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from zipjax import validate
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.experts.fingerprint import fingerprint
from zipjax.experts.forward import hidden_and_logits
from zipjax.model import Model
from zipjax.transformer import Params

ROUTER_FORMAT = "zipjax-expert-router"
ROUTER_VERSION = 1
ARRAYS, MANIFEST = "router.npz", "router.json"


@functools.partial(jax.jit, static_argnames="config")
def _pooled(params: Params, tokens: jax.Array, mask: jax.Array, *, config: ModelConfig) -> jax.Array:
    """Mean of the final-norm hidden states over mask, float32 [batch, embed]; tokens int32 [batch, seq] right
    padded (causal attention: real tokens never see the padding after them), mask bool [batch, seq]."""
    eye = jnp.eye(config.hidden_size, dtype=config.jnp_dtype)
    hidden = hidden_and_logits(params, config, tokens, head=eye)  # [batch, seq, embed]
    weights = mask.astype(jnp.float32)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


def pooled_features(base: Model, prompts: Sequence[Sequence[int]] | np.ndarray, batch: int = 8) -> np.ndarray:
    """float32 [n, embed]: each prompt's mean-pooled base hidden state. Prompts of different lengths are right
    padded to the longest, in batches of `batch` (the last one padded to full size, so one shape compiles)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ZipjaxError("the router needs at least one prompt, and no empty prompt")
    width = max(len(p) for p in prompts)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        tokens = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), bool)
        for j, p in enumerate(chunk):
            tokens[j, :len(p)], mask[j, :len(p)] = p, True
        mask[len(chunk):, 0] = True  # filler rows: one token, results dropped
        out.append(np.asarray(_pooled(base.params, jnp.asarray(tokens), jnp.asarray(mask), config=base.config))
                   [:len(chunk)])
    return np.concatenate(out)


@dataclass
class Router:
    """Softmax classifier over standardized pooled features: logits [n, E] = ((f - mean) / std) @ w + b."""

    names: list[str]
    mean: np.ndarray  # float32 [embed]
    std: np.ndarray  # float32 [embed]
    w: np.ndarray  # float32 [embed, E]
    b: np.ndarray  # float32 [E]
    base_fingerprint: str
    record: dict = field(default_factory=dict)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std) @ self.w + self.b

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """int [n]: index into `names` for features float32 [n, embed]."""
        return np.asarray(self.logits(features)).argmax(-1)

    def predict(self, base: Model, prompts: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """int [n]: the chosen expert's index into `names` for each prompt (token ids)."""
        self.check_base(base)
        return self.predict_features(pooled_features(base, prompts))

    def route(self, base: Model, prompts: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
        """The chosen expert's name for each prompt: what expert="auto" resolves to."""
        return [self.names[i] for i in self.predict(base, prompts)]

    def check_base(self, base: Model) -> None:
        have = fingerprint(base.params)
        if have != self.base_fingerprint:
            raise ZipjaxError(f"this router was trained on a base with fingerprint {self.base_fingerprint[:16]}..., "
                              f"and this base's is {have[:16]}...")

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / ARRAYS, mean=self.mean, std=self.std, w=self.w, b=self.b)
        manifest = {"format": ROUTER_FORMAT, "version": ROUTER_VERSION, "names": self.names,
                    "base_fingerprint": self.base_fingerprint, "features": "mean-pooled final-norm hidden states",
                    "record": self.record}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, base: Model | None = None) -> Router:
        """The router saved in `folder`; with `base`, refuses one trained on other weights."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file() or not (folder / ARRAYS).is_file():
            raise ZipjaxError(f"{folder} holds no router ({MANIFEST} and {ARRAYS})")
        where = folder / MANIFEST
        manifest = validate.manifest(where, ROUTER_FORMAT, (ROUTER_VERSION,), "zipjax router")
        names = list(validate.names(manifest.get("names"), f"{where} names", reserved=("auto",)))
        fingerprint_ = manifest.get("base_fingerprint")
        if not isinstance(fingerprint_, str) or len(fingerprint_) != 64:
            raise ZipjaxError(f"{where} base_fingerprint must be a SHA-256 (64 hex digits), got {fingerprint_!r:.60}")
        record = validate.mapping(manifest.get("record", {}), f"{where} record")
        features, floats = range(1, validate.MAX_WIDTH + 1), ("float32", "float16", "float64")
        members = {"mean": validate.Member((features,), floats), "std": validate.Member((features,), floats),
                   "w": validate.Member((features, len(names)), floats), "b": validate.Member((len(names),), floats)}
        arrays = {k: a.astype(np.float32) for k, a in
                  validate.npz_arrays(folder / ARRAYS, members, "zipjax router").items()}
        embed = arrays["mean"].shape[0]
        if arrays["std"].shape != (embed,) or arrays["w"].shape[0] != embed:
            raise ZipjaxError(f"{folder / ARRAYS}: mean {arrays['mean'].shape}, std {arrays['std'].shape} and head "
                              f"{arrays['w'].shape} disagree on the number of features")
        for key, array in arrays.items():
            if not np.isfinite(array).all():
                raise ZipjaxError(f"{folder / ARRAYS}: {key} holds NaN or infinite values (after float32)")
        if (arrays["std"] <= 0).any():
            raise ZipjaxError(f"{folder / ARRAYS}: std must be positive (it divides the features)")
        router = cls(names=names, base_fingerprint=fingerprint_, record=record, **arrays)
        if base is not None:
            router.check_base(base)
            if base.config.hidden_size != embed:
                raise ZipjaxError(f"the router takes {embed} features, the base has hidden size "
                                  f"{base.config.hidden_size}")
        return router
