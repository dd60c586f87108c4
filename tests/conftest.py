"""Shared fixtures: tiny random Hugging Face models saved with `save_pretrained`, and their zipjax conversions.

Eight fake CPU devices are requested before jax is imported so the sharding tests can build a 2x4 mesh; every other
test runs on the first device as usual.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses
import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from zipjax.convert import convert

import zipjax  # first: it picks the CPU backend before anything else imports jax (zipjax.platform)

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)

# name -> Hugging Face model builder (seeded, float32)
TINY_MODELS = {
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "llama3_rope": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE)),
    "mistral_window": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)),
}


@dataclasses.dataclass
class Tiny:
    name: str
    hf: torch.nn.Module
    hf_dir: Path
    zj_dir: Path

    def load(self, **kwargs) -> zipjax.Model:
        return zipjax.load(self.zj_dir, **kwargs)


def build_tiny(name: str, root: Path) -> Tiny:
    torch.manual_seed(0)
    hf = TINY_MODELS[name]().eval()
    hf_dir, zj_dir = root / f"{name}_hf", root / f"{name}_zj"
    hf.save_pretrained(hf_dir)
    convert(hf_dir, zj_dir, progress=False)
    return Tiny(name, hf, hf_dir, zj_dir)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(name, root) for name in TINY_MODELS}


@pytest.fixture(params=list(TINY_MODELS))
def tiny(request, tiny_models) -> Tiny:
    return tiny_models[request.param]


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 256) -> np.ndarray:
    """Token ids that avoid the special ids 0-2."""
    return np.random.RandomState(seed).randint(3, vocab, (batch, length))


def teacher_forced(model, cache, ids, prompt_len: int):
    """Logits of the prompt's last token, then of each later token fed one at a time: ([batch, steps, vocab], the
    cache after them). Positions count from each sequence's start slot (left padding)."""
    starts = np.asarray(cache.starts)
    positions = np.maximum(np.arange(ids.shape[1], dtype=np.int32)[None] - starts[:, None], 0).astype(np.int32)
    logits, cache = model.apply(ids[:, :prompt_len], positions[:, :prompt_len], cache)
    out = [logits[:, -1]]
    for t in range(prompt_len, ids.shape[1] - 1):
        logits, cache = model.apply(ids[:, t:t + 1], positions[:, t:t + 1], cache)
        out.append(logits[:, 0])
    return np.stack(out, 1), cache


def hf_greedy(hf, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0, eos_token_id=None) -> np.ndarray:
    """transformers' greedy generate on left-padded prompts: [batch, max_prompt + max_new_tokens] (or shorter)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=pad_id, eos_token_id=eos_token_id)
    return out.numpy()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each module's compiled programs when it ends. Every XLA:CPU executable holds its own memory mappings,
    and a whole suite's worth of them exhausts the kernel's per-process limit (vm.max_map_count, 65530): LLVM then
    fails with "Cannot allocate memory" although RAM is free."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
