"""`ExpertBank`: every expert's compressed delta, stacked per weight, as one pytree that jit and a mesh can take.

Sites (`sites(config)`): each weight of the model seen as a 2-D matrix W [in, out], `in` the contracted axis:

    layer_i/attn/q, k, v   [embed, heads * head_dim]   (heads, head_dim) order      out axis: heads / kv_heads
    layer_i/attn/o         [heads * head_dim, embed]
    layer_i/mlp/gate, up   [embed, mlp]      layer_i/mlp/down [mlp, embed]
    embed                  [embed, vocab]    the embedding transposed: one step / minimum per vocabulary row
                                             (token-wise), also the output head of tied models
    lm_head                [embed, vocab]    untied models only

A `LinearDelta` holds E experts of one site: bit planes uint8 [E, in * w / 8, out] (zipjax.experts.quantize),
step and minimum float16 [E, out], salient_idx int32 [E, k] and the exact residual rows float16 [E, k, out] (k fixed
across experts, so shapes are static). Norm deltas are kept exact (float32 [E, embed]). Everything about an expert is
then a row of an array, and an expert id selects it; id -1 means the base alone.

The static metadata (expert names, bits, plane widths, the base fingerprint, how it was built) is part of the
treedef: a jitted function sees a new bank layout as a new program, never a new expert mix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from zipjax.config import ModelConfig
from zipjax.errors import ZipjaxError
from zipjax.experts.quantize import unpack_planes
from zipjax.sharding import logical_sharding


@struct.dataclass
class LinearDelta:
    """E experts' deltas of one weight, W [in, out] view."""

    planes: tuple[jax.Array, ...]  # uint8 [E, in * widths[p] / 8, out] per plane
    step: jax.Array  # float16 [E, out]
    minimum: jax.Array  # float16 [E, out]
    salient_idx: jax.Array  # int32 [E, k]
    salient_rows: jax.Array  # float16 [E, k, out]
    widths: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def in_features(self) -> int:
        return self.planes[0].shape[1] * 8 // self.widths[0]

    @property
    def out_features(self) -> int:
        return self.step.shape[1]

    def codes(self) -> jax.Array:
        """uint8 [E, in, out]."""
        return unpack_planes(self.planes, self.widths)

    def dequantize(self, index: int | jax.Array) -> jax.Array:
        """float32 [in, out]: expert `index`'s delta as the serving paths apply it (codes, then salient residual)."""
        codes = unpack_planes(tuple(p[index] for p in self.planes), self.widths).astype(jnp.float32)
        delta = self.minimum[index].astype(jnp.float32) + self.step[index].astype(jnp.float32) * codes
        return delta.at[self.salient_idx[index]].add(self.salient_rows[index].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Site:
    """How a parameter maps onto the [in, out] view."""

    path: tuple[str, ...]  # into the params tree
    to_view: Callable[[jax.Array], jax.Array]  # param -> [in, out]
    from_view: Callable[[jax.Array], jax.Array]  # [in, out] -> param shape
    out_axis: str | None  # logical axis name of `out`


def sites(config: ModelConfig) -> dict[str, Site]:
    """Every linear site of the model, by name (see the module docstring)."""
    embed, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    identity = lambda w: w
    heads_in = lambda w: w.transpose(1, 0, 2).reshape(w.shape[1], -1)  # [h, d, k] -> [d, h*k] (numpy or jax)
    out: dict[str, Site] = {}
    for i in range(config.num_layers):
        layer = f"layer_{i}"
        for name, n, axis in (("q", heads, "heads"), ("k", kv_heads, "kv_heads"), ("v", kv_heads, "kv_heads")):
            out[f"{layer}/attn/{name}"] = Site(
                (layer, "attn", name), heads_in,
                lambda w, n=n: w.reshape(embed, n, head_dim).transpose(1, 0, 2), axis)
        out[f"{layer}/attn/o"] = Site((layer, "attn", "o"), lambda w: w.reshape(-1, w.shape[-1]),
                                      lambda w: w.reshape(heads, head_dim, embed), None)
        out[f"{layer}/mlp/gate"] = Site((layer, "mlp", "gate"), identity, identity, "mlp")
        out[f"{layer}/mlp/up"] = Site((layer, "mlp", "up"), identity, identity, "mlp")
        out[f"{layer}/mlp/down"] = Site((layer, "mlp", "down"), identity, identity, None)
    out["embed"] = Site(("embed",), lambda w: w.T, lambda w: w.T, "vocab")
    if not config.tie_word_embeddings:
        out["lm_head"] = Site(("lm_head",), identity, identity, "vocab")
    return out


def norm_paths(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    out = {}
    for i in range(config.num_layers):
        for norm in ("attn_norm", "mlp_norm"):
            out[f"layer_{i}/{norm}"] = (f"layer_{i}", norm, "scale")
    out["final_norm"] = ("final_norm", "scale")
    return out


def get_path(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


@struct.dataclass
class ExpertBank:
    linears: dict[str, LinearDelta]  # site name -> stacked deltas
    norms: dict[str, jax.Array]  # norm name -> float32 [E, embed], exact
    names: tuple[str, ...] = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)
    embed_bits: int = struct.field(pytree_node=False)
    base_fingerprint: str = struct.field(pytree_node=False)
    settings: tuple[tuple[str, str], ...] = struct.field(pytree_node=False, default=())  # how it was built
    # the checkpoint folders it was compressed from: `save` keeps clear of them
    sources: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @property
    def num_experts(self) -> int:
        return len(self.names)

    def index(self, name: str | None) -> int:
        """The expert id of `name` (None: -1, the base alone)."""
        if name is None:
            return -1
        if name not in self.names:
            raise ZipjaxError(f"no expert named {name!r} in this bank (it has {', '.join(self.names)})")
        return self.names.index(name)

    def nbytes(self) -> dict[str, int]:
        """Exact bytes held, by kind: codes, scales (step + minimum), salient_idx, salient_rows, norms, embedding
        (every array of the embedding / LM-head sites), total, and per_expert (total / E: every array is stacked
        over experts, nothing is shared)."""
        out = dict.fromkeys(("codes", "scales", "salient_idx", "salient_rows", "norms", "embedding"), 0)
        for name, site in self.linears.items():
            parts = {"codes": sum(p.nbytes for p in site.planes), "scales": site.step.nbytes + site.minimum.nbytes,
                     "salient_idx": site.salient_idx.nbytes, "salient_rows": site.salient_rows.nbytes}
            if name in ("embed", "lm_head"):
                out["embedding"] += sum(parts.values())
            else:
                for kind, n in parts.items():
                    out[kind] += n
        out["norms"] = sum(x.nbytes for x in self.norms.values())
        out["total"] = sum(out.values())
        out["per_expert"] = out["total"] // self.num_experts
        return out

    def save(self, path, *, overwrite: bool = False, sources=()):
        """Write this bank to the folder `path` (zipjax.experts.store); load it back with zipjax.experts.load.
        The folder may not be, contain or lie inside the checkpoints it was compressed from, nor `sources`."""
        from zipjax.experts.bankfile import save

        return save(self, path, overwrite=overwrite, sources=sources)

    def merged_params(self, base_params, config: ModelConfig, index: int):
        """The base parameters with expert `index`'s dequantized delta added: W_b + delta-hat (the "merged" path
        and the reference every mixed path is tested against). Runs where the arrays are (jit it for speed)."""
        params = jax.tree.map(lambda x: x, base_params)  # a copy of the dict structure
        for name, site in sites(config).items():
            w = get_path(params, site.path)
            delta = site.from_view(self.linears[name].dequantize(index))
            _set_path(params, site.path, (w.astype(jnp.float32) + delta).astype(w.dtype))
        for name, path in norm_paths(config).items():
            w = get_path(params, path)
            _set_path(params, path, (w.astype(jnp.float32) + self.norms[name][index]).astype(w.dtype))
        return params


def bytes_per_expert(config: ModelConfig, bits: int, salient: float, embed_bits: int = 4) -> dict[str, int]:
    """`ExpertBank.nbytes()` of one expert computed from the shapes alone (no weights): what a bank of a model
    this size costs per expert, e.g. to count how many Mistral-7B experts fit a memory budget."""
    out = dict.fromkeys(("codes", "scales", "salient_idx", "salient_rows", "norms", "embedding"), 0)
    heads, kv, hd, d, f = (config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size,
                           config.intermediate_size)
    shapes = {"q": (d, heads * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (heads * hd, d),
              "gate": (d, f), "up": (d, f), "down": (f, d)}
    vocab_sites = [("embed", 0)] + ([] if config.tie_word_embeddings else [("lm_head", round(salient * d))])
    for n_in, n_out in shapes.values():
        k = round(salient * n_in)
        out["codes"] += config.num_layers * n_in * n_out * bits // 8
        out["scales"] += config.num_layers * 4 * n_out
        out["salient_idx"] += config.num_layers * 4 * k
        out["salient_rows"] += config.num_layers * 2 * k * n_out
    for _, k in vocab_sites:
        out["embedding"] += d * config.vocab_size * embed_bits // 8 + 4 * config.vocab_size + 4 * k + \
            2 * k * config.vocab_size
    out["norms"] = 4 * d * (2 * config.num_layers + 1)
    out["total"] = sum(out.values())
    return out


def _set_path(tree, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def bank_shardings(bank: ExpertBank, config: ModelConfig, mesh: Mesh):
    """NamedShardings for every bank array: the `out` axis split like the weight's output axis (heads, MLP,
    vocabulary over "model"), everything else replicated (the packed `in` axis interleaves channels, so it is never
    split)."""
    site_defs = sites(config)

    def linear(name: str, site: LinearDelta) -> LinearDelta:
        axis = site_defs[name].out_axis
        place = lambda x, spec: logical_sharding(PartitionSpec(*spec), x.shape, mesh)
        return LinearDelta(
            planes=tuple(place(p, (None, None, axis)) for p in site.planes),
            step=place(site.step, (None, axis)), minimum=place(site.minimum, (None, axis)),
            salient_idx=place(site.salient_idx, ()), salient_rows=place(site.salient_rows, (None, None, axis)),
            widths=site.widths,
        )

    return bank.replace(
        linears={name: linear(name, site) for name, site in bank.linears.items()},
        norms={name: logical_sharding(PartitionSpec(), x.shape, mesh) for name, x in bank.norms.items()},
    )


def place_bank(bank: ExpertBank, config: ModelConfig, mesh: Mesh | None) -> ExpertBank:
    """The bank on the mesh (see `bank_shardings`), or on the default device."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, bank)
    return jax.device_put(bank, bank_shardings(bank, config, mesh))


def host_bank(bank: ExpertBank) -> ExpertBank:
    return jax.tree.map(np.asarray, bank)
