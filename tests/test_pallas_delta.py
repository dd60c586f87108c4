"""The ME-Switch grouped dequantize-matmul kernel against its jnp reference, and the reference against the math.

The reference is pinned first: it must equal a dense dequantize-then-matmul written here in numpy (codes unpacked
with zipjax.kernels.common.unpack, delta = minimum + step * code per output channel, each row times its own
expert's delta, zeros for id -1). Then both forms of the kernel run interpreted, "tpu" (Mosaic's: scalar-prefetched
expert lists per row tile, k and expert-slot axes reduced into the resident output) and "gpu" (Triton's: expert and
k loops inside the program, split-K partials), over every plane layout (1, 2, 4 bits and 3 = (2, 1)), float32 and
bfloat16 x, E = 1 and 5, with small explicit tiles so that there are several row, column and k tiles, a last row
tile that is partial, a row tile of base-only rows and experts no row uses. Compiling for real chips is
tests/test_aot_delta.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zipjax.kernels.common import compiling_for, pack, unpack
from zipjax.kernels.delta_matmul import Blocks, choose_tiling, delta_matmul, reference

M, IN, OUT = 20, 256, 64  # 3 row tiles of 8 (TPU form) or 2 of 16 (GPU form), the last one partial

# along the in axis of [E, in, out] (jitted: one compilation per shape instead of one per operation)
pack_in = jax.jit(lambda codes, w: jnp.swapaxes(pack(jnp.swapaxes(codes, 1, 2), w), 1, 2), static_argnums=1)
unpack_in = jax.jit(lambda plane, w: jnp.swapaxes(unpack(jnp.swapaxes(plane, 1, 2), w), 1, 2), static_argnums=1)


def make(seed: int, widths: tuple[int, ...], experts: int, dtype, m: int = M, fan_in: int = IN, fan_out: int = OUT):
    """x, expert ids, planes, step, minimum; ids use experts 0, 2, 4 only (when E = 5) and rows 8..15 are all -1."""
    rng = np.random.default_rng(seed)
    code = rng.integers(0, 1 << sum(widths), size=(experts, fan_in, fan_out))
    planes, offset = [], 0
    for w in widths:  # plane p holds bits [offset, offset + w) of each code, packed along in
        bits = ((code >> offset) & ((1 << w) - 1)).astype(np.uint8)
        planes.append(pack_in(bits, w))
        offset += w
    used = np.array([-1, *range(0, experts, 2)])
    ids = rng.choice(used, size=m)
    ids[8:16] = -1
    ids[:3] = used[1:][:3].tolist() + [-1] * (3 - len(used[1:][:3]))
    x = jnp.asarray(rng.normal(size=(m, fan_in)), dtype)
    step = jnp.asarray(rng.uniform(0.01, 0.1, size=(experts, fan_out)), jnp.float16)
    minimum = jnp.asarray(rng.normal(size=(experts, fan_out)) * 0.1, jnp.float16)
    return x, jnp.asarray(ids, jnp.int32), tuple(planes), step, minimum


def dense(x, ids, planes, step, minimum, widths) -> np.ndarray:
    """Dequantize every expert's delta in float64, then each row times its own."""
    code, offset = 0, 0
    for plane, w in zip(planes, widths, strict=True):
        code = code + (np.asarray(unpack_in(plane, w)).astype(np.int64) << offset)  # [E, in, out]
        offset += w
    delta = np.asarray(minimum, np.float64)[:, None] + np.asarray(step, np.float64)[:, None] * code
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return np.stack([x64[i] @ delta[e] if e >= 0 else np.zeros(delta.shape[2]) for i, e in enumerate(ids)])


@pytest.mark.parametrize("widths, experts", [((1,), 5), ((2,), 1), ((2, 1), 5), ((4,), 5)])
def test_reference_is_dequantize_then_matmul(widths, experts):
    args = make(1, widths, experts, jnp.float32)
    expected = dense(*args, widths)
    got = np.asarray(reference(*args, widths=widths))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.all(got[np.asarray(args[1]) < 0] == 0)


@pytest.mark.parametrize("backend, widths, experts, dtype", [
    ("tpu", (1,), 5, jnp.float32),
    ("tpu", (2, 1), 5, jnp.bfloat16),
    ("gpu", (2, 1), 5, jnp.float32),
    ("gpu", (4,), 1, jnp.bfloat16),
    (None, (2,), 1, jnp.bfloat16),  # the platform's choice: on the CPU, the TPU form interpreted, default tiles
])
def test_kernel_equals_reference(backend, widths, experts, dtype):
    args = make(2, widths, experts, dtype)
    if backend is None:
        with compiling_for("cpu"):
            got = np.asarray(delta_matmul(*args, widths=widths))
    else:
        blocks = Blocks(m=8, n=32, k=16)  # 3 row tiles (the middle one base-only), 2 column tiles
        if backend == "gpu":
            blocks = Blocks(m=16, n=32, k=16, splits=2)  # 2 row tiles, both padded
        assert IN // max(8 // w for w in widths) // blocks.k >= 2  # several k tiles (2 splits on GPU)
        got = np.asarray(delta_matmul(*args, widths=widths, backend=backend, interpret=True, blocks=blocks))
    expected = np.asarray(reference(*args, widths=widths))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.all(got[np.asarray(args[1]) < 0] == 0)


@pytest.mark.parametrize("fan_in, fan_out, widths", [(4096, 14336, (2,)), (14336, 4096, (2, 1)), (4096, 4096, (1,))])
@pytest.mark.parametrize("m", [8, 2048])
def test_tiles_obey_each_compiler(fan_in, fan_out, widths, m):
    """Mosaic: blocks' last two dims multiples of (8, 128) or whole; Triton: powers of two, dots >= 16 rows; both:
    the tiles divide what they cut."""
    part = fan_in // max(8 // w for w in widths)
    tpu = choose_tiling("tpu", widths, m, fan_in, fan_out, 3, x_dtype=jnp.bfloat16)
    assert tpu.block_m == m or tpu.block_m % 8 == 0
    assert tpu.block_k % 128 == 0 and part % tpu.block_k == 0 and fan_out % tpu.block_n == 0
    assert tpu.block_n % 128 == 0 and tpu.block_k * tpu.block_n <= 1 << 18
    gpu = choose_tiling("gpu", widths, m, fan_in, fan_out, 3, x_dtype=jnp.bfloat16)
    for block in (gpu.block_m, gpu.block_n, gpu.block_k):
        assert block >= 16 and block & (block - 1) == 0
    assert part % gpu.block_k == 0 and fan_out % gpu.block_n == 0 and gpu.k_tiles % gpu.splits == 0


def test_bad_arguments_are_named():
    x, ids, planes, step, minimum = make(4, (2,), 5, jnp.float32, m=4)
    with pytest.raises(ValueError, match="planes"):
        delta_matmul(x, ids, (planes[0][:, :-1],), step, minimum, widths=(2,), interpret=True)
    with pytest.raises(ValueError, match="widths"):
        delta_matmul(x, ids, planes, step, minimum, widths=(3,), interpret=True)
    with pytest.raises(ValueError, match="expert_ids"):
        delta_matmul(x, ids[:-1], planes, step, minimum, widths=(2,), interpret=True)
