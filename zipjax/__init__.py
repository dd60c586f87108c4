"""zipjax: fast, training-free inference accelerations for LLaMA/Mistral/Emu3 in JAX.

    model = zipjax.load("checkpoints/stdlib-llama")
    tokens = zipjax.generate(model, [model.tokenizer.encode("def fib(n):")], max_new_tokens=40)

    emu3 = zipjax.load("emu3-gen")          # a converted Emu3 checkpoint
    image = zipjax.generate_image(emu3, "a cat on a red sofa", size=(720, 720)).images[0]
"""

from zipjax import kv
from zipjax.checkpoint import load
from zipjax.config import ModelConfig, RopeConfig
from zipjax.emu3.image import ImageResult, generate_image
from zipjax.emu3.model import Emu3Model
from zipjax.errors import ZipjaxError
from zipjax.generate import generate, generate_stream
from zipjax.kv.dense import KVCache
from zipjax.model import Model
from zipjax.sharding import make_mesh

__all__ = [
    "Emu3Model",
    "ImageResult",
    "KVCache",
    "Model",
    "ModelConfig",
    "RopeConfig",
    "ZipjaxError",
    "generate",
    "generate_image",
    "generate_stream",
    "kv",
    "load",
    "make_mesh",
]
