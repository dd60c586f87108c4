"""Harness: training the expert router (zipjax.experts.router) and comparing it with other routings.

The head is a linear softmax classifier over the router's features (the base model's mean-pooled final-norm hidden
states), trained with optax AdamW on windows of the experts' training domains (`fit`, `train_router`,
`train_from_texts`; `zipjax experts router` runs the last).

Routing baselines, for comparison (``compare_routing``):
- oracle: the true domain of each held-out window;
- perplexity routing: every expert scores the prompt and the lowest NLL wins (E forwards per prompt);
- random: a uniformly random expert per prompt (seeded).
Each router sees only a prompt (the first `prefix` tokens of a held-out window); routed perplexity is then measured
on the rest of the window with the chosen expert, so no router sees the tokens it is scored on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zipjax.errors import ZipjaxError
from zipjax.experts.fingerprint import fingerprint
from zipjax.experts.router import Router, pooled_features
from zipjax.harness.finetune import window_nll
from zipjax.model import Model


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
