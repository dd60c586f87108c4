"""A model-level router for expert="auto": which expert should serve a prompt, from the base model's own view of it.

ME-Switch turns expert selection into domain classification but does not say with what; zipjax's choice is the
cheapest classifier on what the model already computes: the base model's final-norm hidden states, mean-pooled over the
prompt's real tokens, standardized, and a linear softmax head (one class per expert, no "base" class) trained with
optax on windows of the experts' training domains. Classifying costs one extra forward of the base over the prompt
(perplexity routing costs one per expert).

Routing baselines, for comparison (``compare_routing``):
- oracle: the true domain of each held-out window;
- perplexity routing: every expert scores the prompt and the lowest NLL wins (E forwards per prompt);
- random: a uniformly random expert per prompt (seeded).
Each router sees only a prompt (the first `prefix` tokens of a held-out window); routed perplexity is then measured
on the rest of the window with the chosen expert, so no router sees the tokens it is scored on.

Saved as ``router.npz`` (arrays) and ``router.json`` (names, base fingerprint, training record) in a folder, by
default the expert bank's folder; loading with a base checks its fingerprint. Loading reads the manifest through
zipjax.validate (types, one-line errors) and exactly the four arrays, each checked from its npy header before its data
is read (never a pickle or an object array), then their values (finite, std > 0).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zipjax import validate
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.experts.finetune import hidden_and_logits, window_nll
from zipjax.experts.fingerprint import fingerprint
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


def fit(features: np.ndarray, labels: np.ndarray, names: Sequence[str], base_fingerprint: str, *,
        steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> Router:
    """Train the softmax head on features float32 [n, embed] with int labels [n] (indices into `names`): full-batch
    AdamW on cross entropy, features standardized by their training mean and std."""
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int32)
    if features.ndim != 2 or len(features) != len(labels) or len(features) == 0:
        raise ZipjaxError(f"features [n, embed] and labels [n] do not match: {features.shape}, {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(names):
        raise ZipjaxError(f"labels must lie in [0, {len(names)})")
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = jnp.asarray((features - mean) / std)
    y = jnp.asarray(labels)
    key = jax.random.key(seed)
    head = {"w": 0.01 * jax.random.normal(key, (features.shape[1], len(names))), "b": jnp.zeros((len(names),))}
    optimizer = optax.adamw(lr, weight_decay=weight_decay)
    state = optimizer.init(head)

    def loss_fn(h):
        return optax.softmax_cross_entropy_with_integer_labels(x @ h["w"] + h["b"], y).mean()

    @jax.jit
    def step(h, s):
        loss, grads = jax.value_and_grad(loss_fn)(h)
        updates, s = optimizer.update(grads, s, h)
        return optax.apply_updates(h, updates), s, loss

    start = time.time()
    for _ in range(steps):
        head, state, loss = step(head, state)
    w, b = np.asarray(head["w"], np.float32), np.asarray(head["b"], np.float32)
    train_acc = float((((features - mean) / std @ w + b).argmax(-1) == labels).mean())
    record = {"train_examples": len(labels), "steps": steps, "lr": lr, "weight_decay": weight_decay,
              "seed": seed, "final_loss": round(float(loss), 4), "train_accuracy": round(train_acc, 4),
              "seconds": round(time.time() - start, 2)}
    return Router(names=list(names), mean=mean.astype(np.float32), std=std.astype(np.float32), w=w, b=b,
                  base_fingerprint=base_fingerprint, record=record)


def train_router(base: Model, train_windows: dict[str, np.ndarray], prefixes: Sequence[int] = (64, 256),
                 log: Callable[[str], None] | None = print, **kwargs) -> Router:
    """A router over the experts named by `train_windows` (expert name -> training windows int32 [n, >= seq] of
    its domain). Each window contributes one example per prompt length in `prefixes` (its first p tokens), so the
    head sees short and long prompts."""
    names = list(train_windows)
    feats, labels = [], []
    for label, name in enumerate(names):
        for p in prefixes:
            prompts = np.asarray(train_windows[name])[:, :p]
            feats.append(pooled_features(base, prompts))
            labels.append(np.full(len(prompts), label, np.int32))
        if log is not None:
            log(f"  router features: {name} ({len(train_windows[name])} windows x {len(prefixes)} lengths)")
    router = fit(np.concatenate(feats), np.concatenate(labels), names, fingerprint(base.params), **kwargs)
    router.record["prefixes"] = list(prefixes)
    return router


def train_from_texts(base: Model, texts: dict[str, str], window: int = 256, max_windows: int = 64,
                     log: Callable[[str], None] | None = None) -> Router:
    """A router over the experts named by `texts` (expert name -> text of its domain): each text is cut into up to
    `max_windows` windows of `window` tokens (fewer where the model's positions are fewer) for `train_router`."""
    window = min(window, base.config.max_position_embeddings)
    windows = {}
    for name, text in texts.items():
        ids = base.tokenizer.encode(text, add_special_tokens=False)
        cut = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:max_windows]
        if len(cut) < 2:
            raise ZipjaxError(f"the text for expert {name!r} holds {len(ids)} tokens; a router needs at least "
                              f"{2 * window} (two windows of {window})")
        windows[name] = np.asarray(cut, np.int32)
    prefixes = tuple(p for p in (64, window) if p <= window)
    return train_router(base, windows, prefixes=prefixes, log=log)


def perplexity_routing(experts: dict[str, Model], prompts: np.ndarray, batch: int = 8) -> np.ndarray:
    """int [n]: index (in `experts` order) of the expert with the lowest NLL on each prompt int32 [n, p]: every
    expert scores every prompt, E forwards each."""
    nll = np.stack([window_nll(m.params, m.config, prompts, batch) for m in experts.values()], axis=1)  # [n, E]
    return nll.argmin(axis=1)


def random_routing(n: int, num_experts: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_experts, n)


def compare_routing(base: Model, router: Router, experts: dict[str, Model], heldout: dict[str, np.ndarray],
                    prefix: int = 64, seed: int = 0, batch: int = 8) -> dict:
    """Route held-out windows (domain -> int32 [n, seq + 1]; domains named like the experts) by their first
    `prefix` tokens with the router, by perplexity, at random and by the oracle; report each method's accuracy
    and the perplexity of the chosen expert on the rest of the window (tokens prefix .. seq)."""
    names = list(experts)
    if list(router.names) != names:
        raise ZipjaxError(f"the router's experts {router.names} are not {names}")
    windows = np.concatenate([heldout[n] for n in names])
    labels = np.concatenate([np.full(len(heldout[n]), i) for i, n in enumerate(names)])
    prompts = windows[:, :prefix]
    # continuation NLL of each expert on each window: score the whole window, subtract the prompt's part
    whole = np.stack([window_nll(m.params, m.config, windows, batch) for m in experts.values()], axis=1)
    head = np.stack([window_nll(m.params, m.config, windows[:, :prefix + 1], batch) for m in experts.values()],
                    axis=1)
    rest = whole - head  # [n, E] NLL of tokens prefix+1 .. seq given everything before
    count = windows.shape[1] - 1 - prefix
    choices = {
        "oracle": labels,
        "router": router.predict(base, prompts),
        "perplexity": perplexity_routing(experts, prompts, batch),
        "random": random_routing(len(windows), len(names), seed),
    }
    out = {"prefix": prefix, "windows": len(windows), "scored_tokens_per_window": int(count), "methods": {}}
    for method, choice in choices.items():
        picked = rest[np.arange(len(windows)), choice]
        per_domain = {n: round(math.exp(picked[labels == i].sum() / ((labels == i).sum() * count)), 4)
                      for i, n in enumerate(names)}
        out["methods"][method] = {"accuracy": round(float((choice == labels).mean()), 4),
                                  "perplexity": per_domain}
    return out
