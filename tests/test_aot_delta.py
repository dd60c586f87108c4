"""The ME-Switch grouped dequantize-matmul compiled ahead of time for TPU v5e and an H100, on this CPU-only machine.

Mistral-7B's MLP sites: up/gate (in 4096 -> out 14336) and down (14336 -> 4096), bf16 activations, float16 scales,
expert codes at 2 bits (one plane) or 3 bits (planes of 2 and 1). Decode is a batch of 8 rows over 3 experts
(with base-only rows), prefill 2048 rows over 16 experts. zipjax.aot compiles from abstract arguments (nothing
runs), which proves Mosaic's and Triton's block, layout and VMEM rules at the real shapes and gives the compiler's
memory plan and, on TPU, its bytes accessed. Each case asserts that the Pallas custom call is there and that
nothing else materializes a dequantized weight: no float array the program computes is anywhere near in * out
elements, and the temporaries stay far below one bf16 delta. The decode cases print the kernel's CostEstimate
and XLA's bytes accessed against the packed codes and against a bf16 delta of the same experts.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from zipjax.kernels.delta_matmul import cost_estimate, delta_matmul

from zipjax import aot

SITES = {"up": (4096, 14336), "down": (14336, 4096)}  # Mistral-7B: in, out
WIDTHS = {2: (2,), 3: (2, 1)}
CUSTOM_CALLS = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (f32|bf16|f16)\[([0-9,]*)\]\S* ([\w-]+)\(", re.MULTILINE)


def largest_computed_float(hlo: str) -> int:
    """Elements of the largest float array any instruction of the compiled module (fusions included) produces,
    parameters and bitcasts of them left out."""
    return max((int(np.prod([int(n) for n in dims.split(",") if n])) for _, dims, op in INSTRUCTION.findall(hlo)
                if op not in ("parameter", "bitcast")), default=0)


def compile_site(target_name: str, m: int, site: str, bits: int, experts: int):
    target = aot.target(target_name)
    sharding = aot.on_chip(target)
    fan_in, fan_out = SITES[site]
    widths = WIDTHS[bits]
    args = [aot.array((m, fan_in), jnp.bfloat16, sharding), aot.array((m,), jnp.int32, sharding),
            tuple(aot.array((experts, fan_in * w // 8, fan_out), jnp.uint8, sharding) for w in widths),
            aot.array((experts, fan_out), jnp.float16, sharding), aot.array((experts, fan_out), jnp.float16, sharding)]

    def delta(x, ids, planes, step, minimum):
        return delta_matmul(x, ids, planes, step, minimum, widths=widths)

    compiled, report = aot.compile(delta, *args, target=target)
    return compiled, report, args


@pytest.mark.parametrize("target, m, site, bits, experts", [
    ("v5e:1x1", 8, "up", 2, 3),
    ("v5e:1x1", 2048, "down", 3, 16),
    ("h100", 8, "up", 2, 3),
    ("h100", 8, "down", 3, 16),
])
def test_compiles_without_a_dequantized_copy(target, m, site, bits, experts):
    compiled, report, (x, _, planes, step, _) = compile_site(target, m, site, bits, experts)
    hlo = compiled.as_text()
    kind = "gpu" if target == "h100" else "tpu"
    fan_in, fan_out = SITES[site]
    packed = sum(p.size for p in planes)
    bf16_delta = experts * fan_in * fan_out * 2
    estimate = cost_estimate(x, planes, step, widths=WIDTHS[bits], backend=kind)
    carried = [int(n) for n in re.findall(r'"bytes_accessed":"(\d+)"', hlo)]  # Mosaic's call carries it
    xla = "n/a (no cost analysis for GPU)" if report.bytes_accessed is None else f"{int(report.bytes_accessed)}"
    print(f"\n{target} m={m} {site} ({fan_in}->{fan_out}) {bits}-bit E={experts}: compiled in "
          f"{report.compile_seconds:.1f}s; packed codes {packed} bytes, bf16 delta {bf16_delta}; kernel "
          f"CostEstimate {estimate.bytes_accessed} bytes ({estimate.bytes_accessed / packed:.3f}x packed, "
          f"{estimate.bytes_accessed / bf16_delta:.3f}x bf16), {estimate.flops} flops; XLA bytes accessed {xla}; "
          f"temp {report.temp_bytes}; largest computed float array {largest_computed_float(hlo)} elements")
    assert CUSTOM_CALLS[kind] in hlo
    assert kind == "gpu" or carried == [estimate.bytes_accessed]
    assert largest_computed_float(hlo) < fan_in * fan_out / 4  # the output of a 2048-row prefill is 1/7 of it
    assert report.fits and report.temp_bytes < fan_in * fan_out / 8
    if m == 8 and experts <= m:  # decode: every expert's codes read once, and nothing else of note
        assert packed <= estimate.bytes_accessed < 1.1 * packed
        assert report.bytes_accessed is None or report.bytes_accessed < 1.1 * packed
