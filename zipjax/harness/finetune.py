"""Harness: full fine-tuning of a zipjax model into a domain expert, held-out perplexity, and float16 delta files.

ME-Switch starts from experts fully fine-tuned from one base; none is available offline, so zipjax trains its own
(see zipjax.harness.text_domains): optax AdamW on next-token cross entropy, a jitted step on the functional forward
with plain causal attention (zipjax.experts.forward), random windows of a domain's training stream. Top-level
parameters named in `frozen` (by default the tied embedding) are not trained: the gradient is taken only with
respect to the rest, so a frozen embedding costs no gradient matmul and its delta is exactly zero (zipjax's choice:
on SmolLM2 the embedding is 21% of the weights, and BitDelta too leaves embeddings out of the delta).

An expert is stored as its delta from the base in float16 (``save_deltas``), beside a manifest holding the base's
fingerprint; ``load_experts`` refuses another base. The reference "full expert" is base + the float16 delta, exactly
what the files hold.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zipjax import validate
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.experts.fingerprint import fingerprint
from zipjax.experts.forward import hidden_and_logits
from zipjax.model import Model
from zipjax.transformer import Params

DELTA_FORMAT = "zipjax-expert-deltas"
DELTA_VERSION = 1
MANIFEST = "experts.json"


def token_nll(params: Params, config: ModelConfig, windows: jax.Array) -> jax.Array:
    """-log p of every next token, float32 [batch, seq], for windows int32 [batch, seq + 1]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = hidden_and_logits(params, config, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


_window_nll = jax.jit(lambda p, w, config: token_nll(p, config, w).sum(axis=1), static_argnames="config")


def window_nll(params: Params, config: ModelConfig, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """Summed NLL (nats) per window, float64 [n], for windows int32 [n, seq + 1], in batches of `batch`."""
    out = []
    for i in range(0, len(windows), batch):
        chunk = np.asarray(windows[i:i + batch])
        pad = batch - len(chunk)  # keep one shape: a ragged last batch would compile again
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(_window_nll(params, jnp.asarray(chunk), config), np.float64)[:batch - pad])
    return np.concatenate(out)


def perplexity(params: Params, config: ModelConfig, windows: np.ndarray, batch: int = 8) -> float:
    """Per-token perplexity over windows int32 [n, seq + 1]."""
    return math.exp(window_nll(params, config, windows, batch).sum() / (windows.shape[0] * (windows.shape[1] - 1)))


def finetune(params: Params, config: ModelConfig, stream: np.ndarray, *, steps: int, batch: int, seq: int,
             lr: float, seed: int = 0, frozen: Sequence[str] = ("embed",), warmup: int | None = None,
             log_every: int = 10, log: Callable[[str], None] | None = print) -> tuple[Params, dict]:
    """Fine-tune every parameter except the top-level names in `frozen` on random windows [batch, seq + 1] of
    `stream` (int32 [n]) with AdamW (warmup, cosine decay to lr/10, weight decay 0.01 on matrices, global-norm
    clip 1). Returns the new parameters and a record of the run (losses, time)."""
    if len(stream) < seq + 2:
        raise ZipjaxError(f"a training stream of {len(stream)} tokens is shorter than one window of {seq + 1}")
    unknown = [name for name in frozen if name not in params]
    if unknown:
        raise ZipjaxError(f"cannot freeze {unknown}: the model's top-level parameters are {sorted(params)}")
    fixed = {k: v for k, v in params.items() if k in frozen}
    trainable = {k: v for k, v in params.items() if k not in frozen}
    warmup = max(1, steps // 10) if warmup is None else warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01,
                                        mask=jax.tree.map(lambda x: x.ndim > 1, trainable)))
    opt_state = optimizer.init(trainable)

    def loss_fn(train, fixed, windows):
        return token_nll({**fixed, **train}, config, windows).mean()

    @jax.jit
    def step_fn(train, fixed, opt_state, windows):  # `fixed` an argument: closed over, it would be a constant
        loss, grads = jax.value_and_grad(loss_fn)(train, fixed, windows)
        updates, opt_state = optimizer.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses: list[float] = []
    start = time.time()
    for step in range(1, steps + 1):
        offsets = rng.integers(0, len(stream) - seq - 1, batch)
        windows = jnp.asarray(np.stack([stream[o: o + seq + 1] for o in offsets]))
        trainable, opt_state, loss = step_fn(trainable, fixed, opt_state, windows)
        losses.append(float(loss))
        if log is not None and (step % log_every == 0 or step == steps):
            elapsed = time.time() - start
            log(f"  step {step}/{steps}  loss {np.mean(losses[-log_every:]):.3f}  "
                f"{elapsed / step:.2f} s/step  eta {elapsed / step * (steps - step) / 60:.1f} min")
    record = {"steps": steps, "batch": batch, "seq": seq, "lr": lr, "seed": seed, "frozen": list(frozen),
              "first_loss": round(float(np.mean(losses[:log_every])), 4),
              "final_loss": round(float(np.mean(losses[-log_every:])), 4),
              "seconds": round(time.time() - start, 1)}
    return {**fixed, **trainable}, record


def _flat(params: Params) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def delta_arrays(base: Params, expert: Params) -> dict[str, np.ndarray]:
    """float16 (expert - base) per parameter path ("layer_0/attn/q"), leaving out parameters that did not change."""
    base_flat, expert_flat = _flat(base), _flat(expert)
    if base_flat.keys() != expert_flat.keys() or any(base_flat[k].shape != expert_flat[k].shape for k in base_flat):
        raise ZipjaxError("the expert's parameters do not have the base's names and shapes")
    out = {}
    for key, b in base_flat.items():
        d = expert_flat[key].astype(np.float32) - b.astype(np.float32)
        if np.any(d):
            out[key] = d.astype(np.float16)
    return out


def save_deltas(folder: str | Path, base: Model, experts: dict[str, Params], info: dict[str, dict] | None = None,
                metadata: dict | None = None) -> Path:
    """Write each expert as float16 deltas (``<name>.npz``) and the manifest ``experts.json`` (the base's
    fingerprint, per-expert `info`, and `metadata`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": DELTA_FORMAT, "version": DELTA_VERSION, "base_fingerprint": fingerprint(base.params),
                "base_config": base.config.to_dict() if hasattr(base.config, "to_dict") else None,
                "dtype": "float16", "experts": {}, **(metadata or {})}
    for name, params in experts.items():
        arrays = delta_arrays(base.params, params)
        np.savez(folder / f"{name}.npz", **arrays)
        manifest["experts"][name] = {"file": f"{name}.npz", "parameters": int(sum(a.size for a in arrays.values())),
                                     **(info or {}).get(name, {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ZipjaxError(f"{folder} holds no expert deltas (no {MANIFEST})")
    manifest = validate.manifest(path, DELTA_FORMAT, (DELTA_VERSION,), "zipjax expert-delta")
    experts = validate.mapping(manifest.get("experts"), f"{path} experts")
    for name, entry in experts.items():
        file = validate.mapping(entry, f"{path} expert {name!r:.60}").get("file")
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file in (".", ".."):
            raise ZipjaxError(f"{path} expert {name!r:.60} must name a file in {folder}, got {file!r:.60}")
    return manifest


def check_base(manifest: dict, base: Model, where: str | Path) -> None:
    """Refuse a base whose weights are not the ones the deltas were taken from."""
    have = fingerprint(base.params)
    want = manifest.get("base_fingerprint")
    if have != want:
        raise ZipjaxError(f"the experts in {where} were built on a base with fingerprint {str(want)[:16]}..., "
                          f"and this base's is {have[:16]}...: deltas are only valid on their own base")


def load_experts(folder: str | Path, base: Model, names: Sequence[str] | None = None) -> dict[str, Model]:
    """The full experts base + float16 delta (in the base's dtype), as Models sharing the base's tokenizer folder.
    Refuses a base with another fingerprint and delta files that do not fit the base."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_base(manifest, base, folder)
    names = list(manifest["experts"]) if names is None else list(names)
    base_flat = _flat(base.params)
    out = {}
    for name in names:
        if name not in manifest["experts"]:
            raise ZipjaxError(f"{folder} has no expert {name!r}; it has {', '.join(manifest['experts'])}")
        with np.load(folder / manifest["experts"][name]["file"]) as data:
            deltas = {k: data[k] for k in data.files}
        for key, d in deltas.items():
            if key not in base_flat or base_flat[key].shape != d.shape:
                raise ZipjaxError(f"{folder}/{name}: delta {key} {d.shape} does not fit the base")

        def add(path, leaf, deltas=deltas):
            key = "/".join(str(getattr(k, "key", k)) for k in path)
            if key not in deltas:
                return leaf
            return (leaf.astype(jnp.float32) + jnp.asarray(deltas[key], jnp.float32)).astype(leaf.dtype)

        params = jax.tree_util.tree_map_with_path(add, base.params)
        out[name] = Model(config=base.config, params=params, mesh=base.mesh, path=base.path)
    return out
