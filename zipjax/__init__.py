"""zipjax: fast, training-free inference accelerations for LLaMA/Mistral/Emu3 in JAX.

    model = zipjax.load("checkpoints/stdlib-llama")
    tokens = zipjax.generate(model, [model.tokenizer.encode("def fib(n):")], max_new_tokens=40)
"""

from zipjax.cache import KVCache
from zipjax.checkpoint import load
from zipjax.config import ModelConfig, RopeConfig
from zipjax.errors import ZipjaxError
from zipjax.generate import generate, generate_stream
from zipjax.model import Model
from zipjax.sharding import make_mesh

__all__ = [
    "KVCache",
    "Model",
    "ModelConfig",
    "RopeConfig",
    "ZipjaxError",
    "generate",
    "generate_stream",
    "load",
    "make_mesh",
]
