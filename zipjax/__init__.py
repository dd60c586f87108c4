"""zipjax: fast, training-free inference accelerations for LLaMA/Mistral/Emu3 in JAX.

    model = zipjax.load("checkpoints/stdlib-llama")
    tokens = zipjax.generate(model, [model.tokenizer.encode("def fib(n):")], max_new_tokens=40)

    emu3 = zipjax.load("emu3-gen")          # a converted Emu3 checkpoint
    image = zipjax.generate_image(emu3, "a cat on a red sofa", size=(720, 720)).images[0]
"""

from zipjax.platform import choose_default_platform, enable_compilation_cache

choose_default_platform()  # before anything imports jax
enable_compilation_cache()

from zipjax import kv  # noqa: E402
from zipjax.checkpoint import load  # noqa: E402
from zipjax.config import ModelConfig, RopeConfig  # noqa: E402
from zipjax.emu3.model import Emu3Model  # noqa: E402
from zipjax.errors import ZipjaxError  # noqa: E402
from zipjax.generate import generate, generate_stream  # noqa: E402
from zipjax.image import ImageResult, generate_image  # noqa: E402
from zipjax.kv.dense import KVCache  # noqa: E402
from zipjax.model import Model  # noqa: E402
from zipjax.sharding import make_mesh  # noqa: E402

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
