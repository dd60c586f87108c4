"""Serving a bank: `attach(base, bank) -> Model` whose `deltas` serve the bank's experts per sequence.

    model = attach(zipjax.load("checkpoints/stdlib-llama"), bank)  # kernel=None: the Pallas kernel on TPU/GPU
    zipjax.generate(model, prompts, 64, expert=["docs", "c", None])           # one expert per prompt, None = base
    model.logits(tokens, expert="c")

`attach` returns the base `Model` (same parameters, mesh, tokenizer) with a `DeltaSource` in `model.deltas`:
- `Experts` (the default): W_base for the whole batch plus each sequence's expert delta term (zipjax.experts.delta),
  by the Pallas kernel (`kernel: bool | None`, the one kernel policy of zipjax.platform) or else the jax.numpy
  `path`, "dense" or "grouped". Expert ids are int32 [batch] traced values, so a new mix of experts never
  recompiles; `expert=None` runs every sequence on the base through the same program (ids -1).
- `MergedExperts` (`merged=True`): W_b + delta-hat built once per expert and kept, for a batch that is all one
  expert: the expert-switching baseline, not a delta path.
`expert="auto"` asks the bank's router (zipjax.experts.router) to pick per prompt.

`delta_mode=` ("dense", "grouped", "kernel", "merged"), the spelling before `kernel=` / `path=` / `merged=`, is kept
for one release as a deprecated alias (`DELTA_MODES` maps each onto the new keywords).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.experts.bank import ExpertBank, place_bank
from zipjax.experts.delta import ExpertDeltas, check_path
from zipjax.experts.fingerprint import fingerprint
from zipjax.model import Model
from zipjax.sharding import place, tree_shardings
from zipjax.transformer import Params, abstract_params, param_logical_axes

if TYPE_CHECKING:  # the router module (and its training code) loads only where a router is used
    from zipjax.experts.router import Router

# the deprecated `delta_mode=` names (and the CLI's --delta-mode) as attach's keywords
DELTA_MODES: dict[str, dict] = {
    "dense": {"kernel": False, "path": "dense"},
    "grouped": {"kernel": False, "path": "grouped"},
    "kernel": {"kernel": True},
    "merged": {"merged": True},
}


def expert_ids(model: Model, bank: ExpertBank, router: Router | None, expert, batch: int,
               prompts=None) -> np.ndarray:
    """int32 [batch] from None, a name, or one name (or None) per sequence; "auto" routes `prompts`."""
    if isinstance(expert, str) and expert == "auto":
        expert = route(model, router, prompts)
    if expert is None or isinstance(expert, str):
        expert = [expert] * batch
    if not isinstance(expert, Sequence) or len(expert) != batch:
        raise ZipjaxError(f"expert must be a name, None, 'auto' or one per prompt ({batch}), got {expert!r:.80}")
    return np.asarray([bank.index(e) for e in expert], np.int32)


def route(model: Model, router: Router | None, prompts) -> list[str]:
    """expert="auto": the router's choice per prompt (token id lists or arrays), from `model`'s base features. The
    router's base fingerprint is checked once, by attach, not on every call."""
    if router is None:
        raise ZipjaxError("expert='auto' needs a router, and this bank has none (train one with `zipjax experts "
                          "router` or zipjax.harness.router_training and pass it to attach(..., router=...))")
    if prompts is None:
        raise ZipjaxError("expert='auto' needs the prompts to route")
    from zipjax.experts.router import pooled_features

    return [router.names[i] for i in router.predict_features(pooled_features(model, prompts))]


@dataclasses.dataclass(frozen=True, eq=False)
class Experts:
    """A bank served as per-sequence delta terms on W_base (a `zipjax.model.DeltaSource`)."""

    bank: ExpertBank  # placed like the base parameters
    kernel: bool | None = None  # zipjax.platform.use_kernel, resolved at trace time (zipjax.experts.delta)
    path: str = "dense"  # the jax.numpy path where the kernel does not run: "dense" or "grouped"
    router: Router | None = None

    def batch_inputs(self, model: Model, expert, batch: int, prompts=None) -> tuple[Params, ExpertDeltas]:
        ids = expert_ids(model, self.bank, self.router, expert, batch, prompts)
        return model.params, ExpertDeltas(self.bank, place(ids, model.mesh, PartitionSpec("data")), self.kernel,
                                          self.path, model.mesh is not None)


class MergedExperts:
    """The switching baseline (a `zipjax.model.DeltaSource`): a batch that is all one expert runs the plain model on
    W_base + delta-hat, built on first use and kept here (a whole copy of the weights per expert used: the
    baseline's cost). A cache, so a plain class rather than a frozen record."""

    def __init__(self, bank: ExpertBank, router: Router | None = None):
        self.bank, self.router = bank, router
        self._base: Params | None = None  # the base parameters the copies were built from
        self._copies: dict[int, Params] = {}  # expert index -> merged parameters

    def batch_inputs(self, model: Model, expert, batch: int, prompts=None) -> tuple[Params, None]:
        ids = expert_ids(model, self.bank, self.router, expert, batch, prompts)
        if len(set(ids.tolist())) != 1:
            raise ZipjaxError("merged=True (delta_mode='merged') serves a batch of one expert only (it builds "
                              "W_base + delta once); attach without merged= for a mixed batch")
        return self.merged_params(model, int(ids[0])), None

    def merged_params(self, model: Model, index: int) -> Params:
        """W_base + delta-hat of expert `index` (-1: the base)."""
        if index < 0:
            return model.params
        if model.params is not self._base:  # another model's weights (dataclasses.replace): start over
            self._base, self._copies = model.params, {}
        if index not in self._copies:
            self._copies[index] = _merger(model.config, model.mesh)(model.params, self.bank, jnp.int32(index))
        return self._copies[index]


@functools.lru_cache(maxsize=16)
def _merger(config: ModelConfig, mesh: Mesh | None):
    """`bank.merged_params` jitted once per config and mesh (the expert index is traced), placed like params."""
    shardings = None if mesh is None else tree_shardings(abstract_params(config), param_logical_axes(config), mesh)
    return jax.jit(lambda params, bank, index: bank.merged_params(params, config, index), out_shardings=shardings)


def attach(base: Model, bank: ExpertBank, *, kernel: bool | None = None, path: str = "dense", merged: bool = False,
           router: Router | None = None, check: bool = True, delta_mode: str | None = None) -> Model:
    """`base` serving the experts of `bank`: the same Model with `deltas` set.

    kernel: the Pallas delta kernel; None: where the platform is a TPU or a GPU, the model is on one device and
      every site tiles (zipjax.platform.use_kernel). path: the jax.numpy path otherwise, "dense" (few experts,
      decode) or "grouped" (prefill, many experts). merged: the switching baseline instead (`MergedExperts`).
    check: refuse a bank built on other base weights (hashes the base).
    delta_mode: deprecated, one of `DELTA_MODES` (the spelling before kernel= / path= / merged=).
    """
    if delta_mode is not None:
        kernel, path, merged = _from_delta_mode(delta_mode, kernel, path, merged)
    _check_attach(base, bank, kernel, path, merged, router)
    if check and bank.base_fingerprint != fingerprint(base.params):
        raise ZipjaxError("this expert bank was built on other base weights (the fingerprints differ); a delta is "
                          "only valid on the exact weights it was taken from")
    from zipjax.experts.store import check_shapes

    check_shapes(bank, base)
    if router is not None:
        if router.base_fingerprint != bank.base_fingerprint:
            raise ZipjaxError("the router was trained on other base weights than this bank's")
        unknown = sorted(set(router.names) - set(bank.names))
        if unknown:
            raise ZipjaxError(f"the router picks experts the bank does not have: {', '.join(unknown)}")
    placed = place_bank(bank, base.config, base.mesh)
    source = MergedExperts(placed, router) if merged else Experts(placed, kernel, path, router)
    return dataclasses.replace(base, deltas=source)


def _check_attach(base, bank, kernel, path, merged, router) -> None:
    if not isinstance(base, Model) or base.deltas is not None:
        got = "a Model that already serves experts" if isinstance(base, Model) else type(base).__name__
        raise ZipjaxError(f"attach takes a base zipjax Model, got {got}")
    if not isinstance(bank, ExpertBank):
        raise ZipjaxError(f"attach takes an ExpertBank (zipjax.experts.compress or load), got {type(bank).__name__}")
    if kernel is not None and not isinstance(kernel, bool):
        raise ZipjaxError(f"kernel must be True, False or None (the platform decides), got {kernel!r}")
    check_path(path)
    if not isinstance(merged, bool):
        raise ZipjaxError(f"merged must be True or False, got {merged!r}")
    if merged and (kernel is not None or path != "dense"):
        raise ZipjaxError("merged=True serves the plain model on merged weights; it takes no kernel= or path=")
    if kernel and base.mesh is not None:
        raise ZipjaxError("kernel=True does not run on a mesh yet (the Pallas delta kernel is not shard-mapped); "
                          "use kernel=False or None")
    if router is not None:
        from zipjax.experts.router import Router

        if not isinstance(router, Router):
            raise ZipjaxError(f"router must be a zipjax.experts.router.Router, got {type(router).__name__}")


def _from_delta_mode(delta_mode: str, kernel, path, merged) -> tuple[bool | None, str, bool]:
    if delta_mode not in DELTA_MODES:
        raise ZipjaxError(f"delta_mode must be one of {tuple(DELTA_MODES)}, got {delta_mode!r}")
    if kernel is not None or path != "dense" or merged:
        raise ZipjaxError("delta_mode= is the old spelling of kernel= / path= / merged=; give one or the other")
    warnings.warn(f"attach(delta_mode={delta_mode!r}) is deprecated; use attach(..., "
                  + ", ".join(f"{k}={v!r}" for k, v in DELTA_MODES[delta_mode].items()) + ")",
                  DeprecationWarning, stacklevel=3)
    chosen = {"kernel": None, "path": "dense", "merged": False, **DELTA_MODES[delta_mode]}
    return chosen["kernel"], chosen["path"], chosen["merged"]
