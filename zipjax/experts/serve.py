"""Serving a bank: `attach(base, bank) -> ExpertModel`, and the expert ids `generate` runs with.

    model = attach(zipjax.load("checkpoints/stdlib-llama"), bank)  # delta_mode: "kernel" on TPU/GPU, else "dense"
    zipjax.generate(model, prompts, 64, expert=["docs", "c", None])           # one expert per prompt, None = base
    model.logits(tokens, expert="c")

An `ExpertModel` is a `Model` (same parameters, mesh, tokenizer) that also carries the bank and the static
`delta_mode` ("dense", "grouped", "kernel": zipjax.experts.delta; "merged": W_b + delta-hat built once per expert and
cached, for a batch that is all one expert, the switching baseline). Expert ids are int32 [batch] traced values, so a
new mix of experts never recompiles; `expert=None` on an ExpertModel runs every sequence on the base through the
same program (ids -1). `expert="auto"` asks the bank's router (zipjax.experts.router) to pick per prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.experts.bank import ExpertBank, place_bank
from zipjax.experts.delta import DELTA_MODES, ExpertInputs
from zipjax.experts.fingerprint import fingerprint
from zipjax.model import Model, forward
from zipjax.sharding import mesh_context, place, tree_shardings
from zipjax.transformer import Params, abstract_params, param_logical_axes


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertModel(Model):
    bank: ExpertBank | None = None
    delta_mode: str = "dense"
    router: Any = None  # zipjax.experts.router's classifier, when the bank has one
    _merged: dict = dataclasses.field(default_factory=dict, repr=False)  # expert index -> merged params

    def with_mode(self, delta_mode: str) -> ExpertModel:
        check_mode(delta_mode, self)
        return dataclasses.replace(self, delta_mode=delta_mode, _merged=self._merged)

    def expert_ids(self, expert, batch: int, prompts=None) -> np.ndarray:
        """int32 [batch] from None, a name, or one name (or None) per sequence; "auto" routes `prompts`."""
        if isinstance(expert, str) and expert == "auto":
            expert = route(self, prompts)
        if expert is None or isinstance(expert, str):
            expert = [expert] * batch
        if not isinstance(expert, Sequence) or len(expert) != batch:
            raise ZipjaxError(f"expert must be a name, None, 'auto' or one per prompt ({batch}), got {expert!r:.80}")
        return np.asarray([self.bank.index(e) for e in expert], np.int32)

    def inputs(self, ids: np.ndarray) -> tuple[Params, ExpertInputs | None]:
        """The parameters and expert inputs of a batch with these ids (the merged path: merged parameters, none)."""
        if self.delta_mode == "merged":
            if len(set(ids.tolist())) != 1:
                raise ZipjaxError("delta_mode='merged' serves a batch of one expert only (it builds W_base + delta "
                                  "once); use 'dense', 'grouped' or 'kernel' for a mixed batch")
            return self.merged_params(int(ids[0])), None
        return self.params, ExpertInputs(self.bank, place(ids, self.mesh, PartitionSpec("data")), self.delta_mode)

    def merged_params(self, index: int) -> Params:
        """W_base + delta-hat of expert `index` (-1: the base), built once and kept with the model (a whole copy of
        the weights per expert used: the switching baseline's cost)."""
        if index < 0:
            return self.params
        if index not in self._merged:
            self._merged[index] = _merger(self.config, self.mesh)(self.params, self.bank, jnp.int32(index))
        return self._merged[index]

    def apply(self, tokens: jax.Array, positions: jax.Array, cache=None, *, last_only: bool = False,
              expert=None) -> tuple[jax.Array, Any]:
        """`Model.apply` with each sequence's expert (a name or one per sequence; None: the base)."""
        params, experts = self.inputs(self.expert_ids(expert, tokens.shape[0]))
        with mesh_context(self.mesh):
            return forward(params, tokens, positions, cache, config=self.config, last_only=last_only,
                           experts=experts)

    def logits(self, tokens, expert=None) -> jax.Array:
        """float32 [batch, seq, vocab] of each sequence on its expert (no cache)."""
        tokens = np.asarray(tokens)
        params, experts = self.inputs(self.expert_ids(expert, tokens.shape[0] if tokens.ndim == 2 else 1))
        bound = _Bound(config=self.config, params=params, mesh=self.mesh, path=self.path, experts=experts)
        return Model.logits(bound, tokens)


@functools.lru_cache(maxsize=16)
def _merger(config: ModelConfig, mesh: Mesh | None):
    """`bank.merged_params` jitted once per config and mesh (the expert index is traced), placed like params."""
    shardings = None if mesh is None else tree_shardings(abstract_params(config), param_logical_axes(config), mesh)
    return jax.jit(lambda params, bank, index: bank.merged_params(params, config, index), out_shardings=shardings)


@dataclasses.dataclass(frozen=True, eq=False)
class _Bound(Model):
    """A Model whose `apply` adds fixed expert inputs (so Model.logits' checks and placement are reused)."""

    experts: ExpertInputs | None = None

    def apply(self, tokens, positions, cache=None, *, last_only: bool = False):
        with mesh_context(self.mesh):
            return forward(self.params, tokens, positions, cache, config=self.config, last_only=last_only,
                           experts=self.experts)


def check_mode(delta_mode: str, model: Model) -> None:
    if delta_mode not in DELTA_MODES:
        raise ZipjaxError(f"delta_mode must be one of {DELTA_MODES}, got {delta_mode!r}")
    if delta_mode == "kernel" and model.mesh is not None:
        raise ZipjaxError("delta_mode='kernel' does not run on a mesh yet (the Pallas kernel is not shard-mapped); "
                          "use 'dense' or 'grouped'")


def default_mode(bank: ExpertBank, mesh: Mesh | None) -> str:
    """"kernel" where the Pallas kernel is compiled (TPU or GPU, one device, tiles for every site's shape): the jnp
    paths unpack every expert's codes to float on each call; else "dense". Chosen explicitly, as the KV caches'."""
    from zipjax.kernels import delta_matmul
    from zipjax.kernels.common import platform

    target = platform()
    if target == "cpu" or mesh is not None:
        return "dense"
    sites = [site for name, site in bank.linears.items() if name != "embed"]  # the embedding delta is a gather
    tiled = all(delta_matmul.fits(target, site.widths, site.in_features, site.out_features) for site in sites)
    return "kernel" if tiled else "dense"


def attach(base: Model, bank: ExpertBank, *, delta_mode: str | None = None, router: Any = None,
           check: bool = True) -> ExpertModel:
    """`base` serving the experts of `bank`. delta_mode: None picks `default_mode`. check: refuse a bank built on
    other base weights (hashes the base)."""
    if not isinstance(base, Model) or isinstance(base, ExpertModel):
        raise ZipjaxError(f"attach takes a base zipjax Model, got {type(base).__name__}")
    if not isinstance(bank, ExpertBank):
        raise ZipjaxError(f"attach takes an ExpertBank (zipjax.experts.compress or load), got {type(bank).__name__}")
    if check and bank.base_fingerprint != fingerprint(base.params):
        raise ZipjaxError("this expert bank was built on other base weights (the fingerprints differ); a delta is "
                          "only valid on the exact weights it was taken from")
    from zipjax.experts.store import check_shapes

    check_shapes(bank, base)
    if router is not None:
        if getattr(router, "base_fingerprint", bank.base_fingerprint) != bank.base_fingerprint:
            raise ZipjaxError("the router was trained on other base weights than this bank's")
        unknown = sorted(set(getattr(router, "names", ())) - set(bank.names))
        if unknown:
            raise ZipjaxError(f"the router picks experts the bank does not have: {', '.join(unknown)}")
    model = ExpertModel(config=base.config, params=base.params, mesh=base.mesh, path=base.path,
                        bank=place_bank(bank, base.config, base.mesh), delta_mode="dense", router=router)
    return model.with_mode(default_mode(bank, base.mesh) if delta_mode is None else delta_mode)


def route(model: ExpertModel, prompts) -> list[str | None]:
    """expert="auto": the router's choice per prompt."""
    if model.router is None:
        raise ZipjaxError("expert='auto' needs a router, and this bank has none (train one with "
                          "zipjax.experts.router and pass it to attach(..., router=...))")
    if prompts is None:
        raise ZipjaxError("expert='auto' needs the prompts to route")
    from zipjax.experts import router as router_module

    return list(router_module.route(model, prompts))


def generate_inputs(model: Model, expert, batch: int, prompts) -> tuple[Params, ExpertInputs | None]:
    """What `zipjax.generate(model, prompts, n, expert=...)` runs with: the parameters and the expert inputs."""
    if not isinstance(model, ExpertModel):
        if expert is not None:
            raise ZipjaxError("expert= needs a model with experts: zipjax.experts.attach(base, bank)")
        return model.params, None
    return model.inputs(model.expert_ids(expert, batch, prompts))
