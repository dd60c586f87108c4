"""`compress(base, experts)`: ME-Switch's mixed-precision deltas for a set of experts fine-tuned from one base.

    bank = compress(base, {"docs": docs_model, "c": c_model}, bits=2, salient=0.02, calibration=ids)

Per linear site (zipjax.experts.bank) and expert: delta = W_expert - W_base in float32, its input channels scored,
the top k = round(salient * in) kept exact as float16 residual rows, every channel quantized to `bits` with one
step / minimum per output channel fitted on the non-salient rows (zipjax.experts.quantize). Norm deltas are kept
exact.

zipjax's choices (the ME-Switch abstract gives none of them):
- bits=2 and salient=0.02 by default: on SmolLM2-135M (scoping note) 2 bits with 2% error-chosen salient channels
  cut the output error from 0.210 to 0.125; 1 bit is the BitDelta point (sign x per-column mean|delta|);
- saliency weighted by the RMS of each input channel's activations on calibration text (`calibration`), run
  through the *expert* (the activations its delta will see); without calibration every channel weighs 1;
- the embedding (and an untied LM head) at `embed_bits=4`: a vocabulary-sized table is most of a small model's
  delta (SmolLM2 ties 28M of its 135M parameters) and the ids a domain uses are few, so 4 bits per row costs little
  and loses little. The embedding is quantized token-wise (one step / minimum per vocabulary row) and keeps no
  salient channels (a lookup has no activations to weigh them by); an untied LM head keeps them like any linear.
- scale distillation (BitDelta's logit-matching of the scales) is not done.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zipjax.checkpoint import check_finite
from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.experts.bank import ExpertBank, LinearDelta, get_path, norm_paths, sites
from zipjax.experts.fingerprint import fingerprint
from zipjax.experts.quantize import QUANTIZERS, SCORES, check_packable, pack_planes, plane_widths, quantize
from zipjax.model import Model, check_token_ids
from zipjax.sharding import to_host
from zipjax.transformer import Projections, Transformer, abstract_params
from zipjax.validate import integer

MAX_SALIENT = 0.5  # beyond this a float16 copy of the delta would be smaller


def compress(base: Model, experts: Mapping[str, Model | dict], bits: int = 2, salient: float = 0.02,
             calibration=None, *, score: str = "error", quantizer: str = "mse", embed_bits: int = 4) -> ExpertBank:
    """A bank of `experts` (name -> Model or parameter tree of the base's architecture and shapes) as compressed
    deltas on `base`.

    calibration: token ids for the activation statistics of the saliency score: one set for every expert (an int
      array [n, seq] or a list of token lists) or a dict name -> such a set; None weighs every channel equally.
    score: "error" (reconstruction error x activation RMS), "magnitude" (||delta_j||, an ablation) or "none" (no
      salient channels). quantizer: "mse" (clipping searched) or "minmax".
    """
    config, names = _check_inputs(base, experts, bits, salient, score, quantizer, embed_bits)
    base_params = _host_params(base.params)
    expert_params = [_expert_params(name, experts[name], config, base_params) for name in names]
    site_defs = sites(config)
    for name, site in site_defs.items():
        in_features = site.to_view(get_path(base_params, site.path)).shape[0]
        check_packable(in_features, plane_widths(embed_bits if name in ("embed", "lm_head") else bits), name)

    linears: dict[str, list] = {name: [] for name in site_defs}
    for name, params in zip(names, expert_params, strict=True):
        rms = _activation_rms(params, config, _calibration_for(calibration, name, config), score)
        for site_name, site in site_defs.items():
            site_bits = embed_bits if site_name in ("embed", "lm_head") else bits
            base_view = np.asarray(site.to_view(get_path(base_params, site.path)), np.float32)
            delta = np.asarray(site.to_view(get_path(params, site.path)), np.float32) - base_view
            k = 0 if site_name == "embed" else round(salient * delta.shape[0])
            linears[site_name].append(quantize(delta, site_bits, k, quantizer=quantizer, score=score,
                                               act_rms=rms.get(site_name)))
    norms = {
        name: np.stack([np.asarray(get_path(p, path), np.float32) - np.asarray(get_path(base_params, path), np.float32)
                        for p in expert_params])
        for name, path in norm_paths(config).items()
    }
    settings = (("salient", repr(salient)), ("score", score), ("quantizer", quantizer),
                ("calibration", "none" if calibration is None else "per-expert" if isinstance(calibration, Mapping)
                 else "shared"))
    return ExpertBank(
        linears={name: _stack(qs, plane_widths(embed_bits if name in ("embed", "lm_head") else bits))
                 for name, qs in linears.items()},
        norms=norms, names=tuple(names), bits=bits, embed_bits=embed_bits,
        base_fingerprint=fingerprint(base.params), settings=settings,
        sources=tuple(str(m.path) for m in (base, *experts.values()) if isinstance(m, Model) and m.path is not None),
    )


def _stack(quantized: list, widths: tuple[int, ...]) -> LinearDelta:
    codes = np.stack([q.codes for q in quantized])  # [E, in, out]
    return LinearDelta(
        planes=pack_planes(codes, widths),
        step=np.stack([q.step for q in quantized]), minimum=np.stack([q.minimum for q in quantized]),
        salient_idx=np.stack([q.salient_idx for q in quantized]).astype(np.int32),
        salient_rows=np.stack([q.salient_rows for q in quantized]).astype(np.float16),
        widths=widths,
    )


def _check_inputs(base, experts, bits, salient, score, quantizer, embed_bits) -> tuple[ModelConfig, list[str]]:
    if not isinstance(base, Model):
        raise ZipjaxError(f"base must be a zipjax Model (zipjax.load), got {type(base).__name__}")
    if base.config.architecture == "emu3":
        raise ZipjaxError("expert banks cover the language models (LLaMA, Mistral); emu3 is not supported")
    if not isinstance(experts, Mapping) or not experts:
        raise ZipjaxError("experts must be a non-empty dict name -> Model (or parameter tree)")
    names = list(experts)
    for name in names:
        if not isinstance(name, str) or not name or name == "auto":
            raise ZipjaxError(f"expert names must be non-empty strings other than 'auto', got {name!r}")
    plane_widths(integer(bits, "bits"))
    integer(embed_bits, "embed_bits")
    if embed_bits not in (1, 2, 3, 4):
        raise ZipjaxError(f"embed_bits must be one of [1, 2, 3, 4], got {embed_bits!r}")
    if isinstance(salient, bool) or not isinstance(salient, int | float) or not 0 <= salient <= MAX_SALIENT:
        raise ZipjaxError(f"salient must be a fraction of the input channels in [0, {MAX_SALIENT}], got {salient!r}")
    if score not in SCORES:
        raise ZipjaxError(f"score must be one of {SCORES}, got {score!r}")
    if quantizer not in QUANTIZERS:
        raise ZipjaxError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    for name, model in (("the base", base), *((f"expert {n!r}", e) for n, e in experts.items())):
        check_finite(model.params if isinstance(model, Model) else model, name)
    return base.config, names


def _host_params(params) -> dict:
    return jax.tree.map(lambda x: np.asarray(to_host(x)), params)


def _expert_params(name: str, expert, config: ModelConfig, base_params) -> dict:
    if isinstance(expert, Model):
        if _arch(expert.config) != _arch(config):
            diff = sorted(k for k, v in _arch(config).items() if _arch(expert.config).get(k) != v)
            raise ZipjaxError(f"expert {name!r} is not of the base's architecture: its {', '.join(diff)} differ")
        params = expert.params
    elif isinstance(expert, dict):
        params = expert
    else:
        raise ZipjaxError(f"expert {name!r} must be a Model or a parameter tree, got {type(expert).__name__}")
    expected = {jax.tree_util.keystr(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(abstract_params(config))}
    try:
        actual = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    except Exception:
        actual = {}
    if actual != expected:
        bad = sorted(set(expected) ^ set(actual)) or sorted(k for k in expected if expected[k] != actual[k])
        raise ZipjaxError(f"expert {name!r} does not have the base's parameter names and shapes (first mismatch: "
                          f"{bad[0]})")
    return _host_params(params)


def _arch(config: ModelConfig) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    d.pop("dtype", None)
    return d


def _calibration_for(calibration, name: str, config: ModelConfig) -> list[np.ndarray] | None:
    if calibration is None:
        return None
    if isinstance(calibration, Mapping):
        if name not in calibration:
            raise ZipjaxError(f"calibration has no token ids for expert {name!r}")
        calibration = calibration[name]
    if isinstance(calibration, np.ndarray | jax.Array):
        calibration = np.asarray(calibration)
        seqs = list(calibration) if calibration.ndim == 2 else [calibration]
    else:
        seqs = [np.asarray(s) for s in calibration]
    if not seqs or any(s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.integer) for s in seqs):
        raise ZipjaxError(f"calibration for expert {name!r} must be non-empty sequences of token ids")
    for s in seqs:
        check_token_ids(s, config.vocab_size, f"calibration token ids of expert {name!r}")
        if s.size > config.max_position_embeddings:
            raise ZipjaxError(f"a calibration sequence of {s.size} tokens exceeds the model's "
                              f"{config.max_position_embeddings} positions")
    return seqs


def _record_sumsq(next_fun, args, kwargs, context):
    """A flax method interceptor: every projection (the transformer's `Projections.linear(name, equation, x, w,
    deltas)`) sows its input's per-channel sum of squares into "intermediates" as "<name>_sumsq"."""
    if context.method_name == "linear" and isinstance(context.module, Projections):
        name, x = args[0], args[2]
        context.module.sow("intermediates", f"{name}_sumsq",
                           jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(0, 1)).ravel())
    return next_fun(*args, **kwargs)


@functools.partial(jax.jit, static_argnames=("config",))
def _sown_statistics(params, tokens: jax.Array, positions: jax.Array, *, config: ModelConfig):
    """The model's forward with each projection's input sum of squares recorded (the model records nothing itself:
    the interceptor reads every projection's input)."""
    with nn.intercept_methods(_record_sumsq):
        return Transformer(config).apply({"params": params}, tokens, positions, mutable=["intermediates"])


def _activation_rms(params, config: ModelConfig, seqs: list[np.ndarray] | None, score: str) -> dict[str, np.ndarray]:
    """RMS over calibration tokens of each input channel of every site (keys as `sites`), from the sums of squares
    that `_sown_statistics` records per site; {} without calibration (or when the score does not use it)."""
    if seqs is None or score != "error":
        return {}
    sums: dict[str, np.ndarray] = {}
    count = 0
    by_length: dict[int, list[np.ndarray]] = {}
    for s in seqs:
        by_length.setdefault(len(s), []).append(s.astype(np.int32))
    for length, group in by_length.items():
        tokens = np.stack(group)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        _, state = _sown_statistics(params, tokens, positions, config=config)
        for path, value in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
            keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            keys = [k for k in keys if isinstance(k, str)]
            site = "/".join(keys)[: -len("_sumsq")]
            sums[site] = sums.get(site, 0) + np.asarray(value, np.float64)
        count += tokens.size
    return {site: np.sqrt(total / count).astype(np.float32) for site, total in sums.items()}
