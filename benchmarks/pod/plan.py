"""What the pod benchmark compiles: the grid's axes (models, topologies, caches, contexts), the per-chip programs
of a run (the full plan, or the quick one for CI and tests), and the model shapes and compile targets they name."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from zipjax import aot, kv
from zipjax.config import PUBLISHED, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "checkpoints" / "stdlib-llama"
GIB = 1 << 30

MODELS = ("llama-3-8b", "llama-3-70b", "mistral-7b", "emu3-gen")
# name -> (topology string, chips); v5p names count TensorCores (2 per chip), v5e and v6e chips
TOPOLOGIES = {"v5e-4": "v5e:2x2", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
              "v5p-8": "v5p:2x2x1", "v5p-32": "v5p:2x2x4", "v6e-8": "v6e:2x4"}
# the smallest topology of a generation with m chips: where an m-way per-chip program is compiled
HOSTS = {"v5e": {1: "v5e:1x1", 2: "v5e:1x2", 4: "v5e:2x2", 8: "v5e:2x4", 16: "v5e:4x4"},
         "v5p": {1: "v5p:1x1x1", 2: "v5p:1x2x1", 4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4"},
         "v6e": {1: "v6e:1x1", 2: "v6e:1x2", 4: "v6e:2x2", 8: "v6e:2x4", 16: "v6e:4x4"}}
CACHES: dict[str, kv.Method | None] = {"dense": None,  # methods by their names in zipjax.kv.METHODS
                                       "zipcache-4/2": kv.method_from_name("zipcache", high_bits=4, low_bits=2),
                                       "kivi-2": kv.method_from_name("kivi", bits=2)}
CONTEXTS = (2048, 8192, 32768)
MAX_BATCH = 256
DECODE_ROOM = 256  # slots after the prompt block of a compressed cache (its full-precision window and a block)
ZIPAR_ROWS, ZIPAR_SLOTS = 90, 8320  # Emu3-Gen 90x90 codes (+ EOL tokens and the prompt), guidance: 2 sequences
# interchip interconnect per chip, bytes/s (vendor spec sheets: v5e 1,600 Gbps, v5p 4,800 Gbps, v6e 3,584 Gbps)
ICI = {"v5e": 200e9, "v5p": 600e9, "v6e": 448e9}


@dataclasses.dataclass(frozen=True)
class Program:
    """A per-chip program: one model on an m-way "model" axis of one chip generation, with one cache."""

    model: str
    gen: str
    m: int
    cache: str

    @property
    def key(self) -> str:
        return f"{self.model}|{self.gen}|m{self.m}|{self.cache}"


@dataclasses.dataclass(frozen=True)
class Plan:
    decode: tuple[Program, ...]  # every cache kind listed is compiled; compressed ones need their dense program
    prefill: tuple[tuple[str, str, int], ...]  # (model, gen, m) compiled at every context
    zipar: tuple[tuple[str, int], ...]  # (gen, m) for Emu3-Gen
    contexts: tuple[int, ...]
    topologies: tuple[str, ...]
    validate: bool
    prefill_contexts: tuple[int, ...] = CONTEXTS


def full_plan() -> Plan:
    dense = [("llama-3-8b", "v5e", m) for m in (2, 4, 8)] + [
        ("mistral-7b", "v5e", 4), ("emu3-gen", "v5e", 4), ("llama-3-70b", "v5e", 16),
        ("llama-3-8b", "v5p", 1), ("llama-3-8b", "v5p", 4), ("llama-3-70b", "v5p", 4),
        ("llama-3-8b", "v6e", 1), ("llama-3-8b", "v6e", 2), ("llama-3-70b", "v6e", 8)]
    quant = [("llama-3-8b", "v5e", 4), ("llama-3-70b", "v5e", 16), ("llama-3-8b", "v5p", 1)]
    programs = [Program(*p, "dense") for p in dense]
    programs += [Program(*p, c) for p in quant for c in ("zipcache-4/2", "kivi-2")]
    prefill = (("llama-3-8b", "v5e", 4), ("llama-3-70b", "v5e", 16))
    return Plan(tuple(programs), prefill, (("v5e", 4), ("v5p", 1), ("v6e", 1)), CONTEXTS, tuple(TOPOLOGIES), True,
                (2048, 8192))


def quick_plan() -> Plan:
    """The shipped model's shape (6 layers, width 192) on v5e, dense cache, contexts 512 and 1024: the code paths of
    the full run (compiles, fits, bisection, roofline, table, plot) in under a minute (a compressed cache's compile
    alone takes 10-50 s, so it is left out here; tests/test_pod.py checks its fit arithmetic)."""
    programs = (Program("stdlib-llama", "v5e", 2, "dense"),)
    return Plan(programs, (("stdlib-llama", "v5e", 2),), (), (512, 1024), ("v5e-4",), False, (1024,))


@functools.cache
def model_config(model: str) -> ModelConfig:
    """A published config, or "stdlib-llama": the shipped checkpoint's shape in bfloat16 (the quick mode's model)."""
    if model == "stdlib-llama":
        from zipjax.checkpoint import read_config

        return read_config(SHIPPED)[0].replace(dtype="bfloat16")
    return PUBLISHED[model]


def config_of(model: str, layers: int) -> ModelConfig:
    return model_config(model).replace(num_layers=layers)


@functools.cache
def host(gen: str, m: int) -> aot.Target:
    return aot.target(HOSTS[gen][m])


@functools.cache
def chips_of(topology: str) -> int:
    return len(aot.target(TOPOLOGIES[topology]).devices)


def gen_of(topology: str) -> str:
    return TOPOLOGIES[topology].split(":")[0]
