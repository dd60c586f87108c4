"""The expert delta term of a mixed batch: each row x (a token of a sequence served by expert e) gets

    x @ delta_e = (x @ codes_e) * step_e + sum(x) * minimum_e + x[salient_idx_e] @ salient_rows_e

added to x @ W_base, which is computed once for the whole batch. Expert id -1 gets nothing (the base model). No path
ever builds a merged weight per request (BitDelta, DeltaZip, Punica and S-LoRA all batch this way). Paths:

- "dense": the term of every expert for every row, then a one-hot select: E small matmuls, no data-dependent
  shapes; best with few experts and few rows (decode). Measured on CPU (576 -> 1536, 2-bit, E=4): 0.28 ms at 8 rows.
- "grouped": rows sorted by expert id, one `jax.lax.ragged_dot` over the segments (Punica's SGMV, DeltaZip's SBMM),
  unsorted; the work is one matmul's whatever E is: prefill, many experts (64 ms against dense's 76 ms at 512 rows).
- "kernel": the code part by the Pallas grouped dequantize-matmul over the packed planes
  (zipjax.kernels.delta_matmul), the salient part as in "grouped". On CPU the kernel runs in Pallas' interpreter.

`ExpertDeltas` (the model's `zipjax.deltas.WeightDeltas` for a bank) runs the kernel by the one kernel policy
(`kernel: bool | None`, zipjax.platform.use_kernel, resolved at trace time) and otherwise its jax.numpy `path`,
"dense" or "grouped". The merged baseline (W_b + delta-hat built once per expert) is no path of this module:
zipjax.experts.serve's `MergedExperts`.

All terms are computed in float32 and cast to the activation dtype by the caller (zipjax.transformer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from zipjax.errors import ZipjaxError
from zipjax.experts.bank import ExpertBank, LinearDelta
from zipjax.experts.quantize import unpack_planes
from zipjax.platform import platform, use_kernel

PATHS = ("dense", "grouped")  # the jax.numpy paths, for when the kernel does not run


def _dense(site: LinearDelta, x: jax.Array, ids: jax.Array) -> jax.Array:
    """x [m, in], ids int32 [m] -> float32 [m, out]."""
    codes = site.codes().astype(jnp.float32)  # [E, in, out]
    z = jnp.einsum("mi,eio->emo", x, codes, preferred_element_type=jnp.float32)
    term = z * site.step.astype(jnp.float32)[:, None] + jnp.sum(x, axis=-1)[None, :, None] * site.minimum.astype(
        jnp.float32)[:, None]
    if site.salient_idx.shape[1]:
        xs = jnp.take(x, site.salient_idx, axis=1)  # [m, E, k]
        term = term + jnp.einsum("mek,eko->emo", xs, site.salient_rows.astype(jnp.float32))
    onehot = jax.nn.one_hot(ids, site.step.shape[0], dtype=jnp.float32)  # [m, E]; id -1: all zero
    return jnp.einsum("emo,me->mo", term, onehot)


def _sorted(ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """The row order that groups rows by expert (base rows last) and the rows per expert, int32 [E]."""
    key = jnp.where(ids < 0, num_experts, ids)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.sum(jax.nn.one_hot(key, num_experts, dtype=jnp.int32), axis=0)
    return order, sizes


def _grouped_salient(site: LinearDelta, x: jax.Array, ids: jax.Array, order: jax.Array,
                     sizes: jax.Array) -> jax.Array:
    """x[salient_idx_e] @ salient_rows_e per row, float32 [m, out] in the original row order."""
    safe = jnp.maximum(ids, 0)
    xs = jnp.take_along_axis(x, site.salient_idx[safe], axis=1)  # [m, k]
    out = jax.lax.ragged_dot(xs[order], site.salient_rows.astype(jnp.float32), sizes)
    return jnp.zeros_like(out).at[order].set(out)


def _grouped(site: LinearDelta, x: jax.Array, ids: jax.Array) -> jax.Array:
    num_experts = site.step.shape[0]
    order, sizes = _sorted(ids, num_experts)
    codes = site.codes().astype(jnp.float32)
    z = jax.lax.ragged_dot(x[order], codes, sizes, preferred_element_type=jnp.float32)  # [m, out], sorted
    z = jnp.zeros_like(z).at[order].set(z)
    safe = jnp.maximum(ids, 0)
    term = z * site.step[safe].astype(jnp.float32) + jnp.sum(x, -1, keepdims=True) * site.minimum[safe].astype(
        jnp.float32)
    if site.salient_idx.shape[1]:
        term = term + _grouped_salient(site, x, ids, order, sizes)
    return jnp.where((ids >= 0)[:, None], term, 0.0)


def _kernel(site: LinearDelta, x: jax.Array, ids: jax.Array) -> jax.Array:
    from zipjax.kernels import delta_matmul  # helper module of the Pallas kernel; imported only on this path

    term = delta_matmul.delta_matmul(x, ids, site.planes, site.step, site.minimum, widths=site.widths,
                                     interpret=platform() == "cpu")
    if site.salient_idx.shape[1]:
        order, sizes = _sorted(ids, site.step.shape[0])
        term = term + _grouped_salient(site, x, ids, order, sizes)
    return jnp.where((ids >= 0)[:, None], term, 0.0)


_PATHS = {"dense": _dense, "grouped": _grouped, "kernel": _kernel}


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ZipjaxError(f"path must be one of {PATHS} (the jax.numpy delta paths), got {path!r}")
    return path


def kernel_runs(kernel: bool | None, bank: ExpertBank, sharded: bool) -> bool:
    """The one kernel policy (zipjax.platform.use_kernel) for the delta term: True or False forces it; None runs the
    compiled kernel where the platform traced for is a TPU or a GPU, the bank sits on one device (the kernel is not
    shard-mapped) and every site's shape has tiles (the jnp paths unpack every expert's codes to float on each call);
    else the jnp path."""
    if kernel is not None:
        return kernel
    if sharded or not use_kernel(None):
        return False
    from zipjax.kernels import delta_matmul  # helper module of the Pallas kernel; imported only on this path

    target = platform()
    shapes = {(site.widths, site.in_features, site.out_features)
              for name, site in bank.linears.items() if name != "embed"}  # the embedding delta is a gather
    return all(delta_matmul.fits(target, *shape) for shape in shapes)


def linear_delta(site: LinearDelta, x: jax.Array, ids: jax.Array, mode: str) -> jax.Array:
    """The delta term float32 [m, out] of rows x [m, in] served by experts ids int32 [m] (-1: none); mode "dense",
    "grouped" or "kernel"."""
    return _PATHS[mode](site, x.astype(jnp.float32), ids)


def embedding_delta(site: LinearDelta, tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of the embedding delta, float32 [m, embed], for tokens int32 [m] of experts ids [m] (-1: zeros). The
    embedding site is the transposed table [embed, vocab], so a token's row is a column of every plane."""
    safe = jnp.maximum(ids, 0)
    planes = tuple(p[safe, :, tokens] for p in site.planes)  # [m, embed * w / 8] each
    codes = unpack_planes(tuple(p[..., None] for p in planes), site.widths)[..., 0].astype(jnp.float32)  # [m, embed]
    rows = site.minimum[safe, tokens].astype(jnp.float32)[:, None] + site.step[safe, tokens].astype(
        jnp.float32)[:, None] * codes
    if site.salient_idx.shape[1]:
        extra = site.salient_rows[safe, :, tokens].astype(jnp.float32)  # [m, k]
        rows = jax.vmap(lambda r, i, e: r.at[i].add(e))(rows, site.salient_idx[safe], extra)
    return jnp.where((ids >= 0)[:, None], rows, 0.0)


@struct.dataclass
class ExpertDeltas:
    """The model's `zipjax.deltas.WeightDeltas` for a bank: the bank, one expert id per sequence (traced, so a new
    mix of experts never recompiles) and the static choice of path."""

    bank: ExpertBank
    ids: jax.Array  # int32 [batch]; -1: the base model
    kernel: bool | None = struct.field(pytree_node=False, default=None)  # zipjax.platform.use_kernel
    path: str = struct.field(pytree_node=False, default="dense")  # the jnp path where the kernel does not run
    sharded: bool = struct.field(pytree_node=False, default=False)  # the bank is placed on a mesh

    @property
    def mode(self) -> str:
        """The path this trace runs: "kernel", "dense" or "grouped"."""
        return "kernel" if kernel_runs(self.kernel, self.bank, self.sharded) else self.path

    def _rows(self, seq: int) -> jax.Array:
        return jnp.repeat(self.ids, seq)  # [batch * seq], row-major like x.reshape(batch * seq, ...)

    def linear(self, site: str, x: jax.Array) -> jax.Array:
        """x [batch, seq, in] -> float32 [batch, seq, out]."""
        batch, seq, _ = x.shape
        out = linear_delta(self.bank.linears[site], x.reshape(batch * seq, -1), self._rows(seq), self.mode)
        return out.reshape(batch, seq, -1)

    def embedding(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, seq] -> float32 [batch, seq, embed]."""
        batch, seq = tokens.shape
        out = embedding_delta(self.bank.linears["embed"], tokens.reshape(-1), self._rows(seq))
        return out.reshape(batch, seq, -1)

    def norm(self, name: str) -> jax.Array:
        """float32 [batch, 1, embed]: the norm-scale delta of each sequence's expert."""
        delta = self.bank.norms[name][jnp.maximum(self.ids, 0)]
        return jnp.where((self.ids >= 0)[:, None], delta, 0.0)[:, None, :]

    def take(self, rows: jax.Array) -> ExpertDeltas:
        """The deltas of batch rows `rows` only (int32 [r])."""
        return self.replace(ids=jnp.take(self.ids, rows))
