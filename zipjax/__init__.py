"""zipjax: fast, training-free inference accelerations for LLaMA/Mistral/Emu3 in JAX.

    model = zipjax.load("checkpoints/stdlib-llama")
    tokens = zipjax.generate(model, [model.tokenizer.encode("def fib(n):")], max_new_tokens=40)

    emu3 = zipjax.load("emu3-gen")          # a converted Emu3 checkpoint
    image = zipjax.generate_image(emu3, "a cat on a red sofa", size=(720, 720)).images[0]

The names below load on first use (PEP 562), so importing one module of the package (a kernel, `zipjax.cache`)
loads only what that module imports, not the whole library. `choose_default_platform` still runs first, before
anything imports jax.
"""

import importlib
import importlib.util
import sys
import types

from zipjax.platform import choose_default_platform, enable_compilation_cache

choose_default_platform()  # before anything imports jax
enable_compilation_cache()

# public name -> (module, attribute; None: the module itself)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "Emu3Model": ("zipjax.emu3.model", "Emu3Model"),
    "ImageResult": ("zipjax.image", "ImageResult"),
    "KVCache": ("zipjax.kv.dense", "KVCache"),
    "Model": ("zipjax.model", "Model"),
    "ModelConfig": ("zipjax.config", "ModelConfig"),
    "RopeConfig": ("zipjax.config", "RopeConfig"),
    "ZipjaxError": ("zipjax.errors", "ZipjaxError"),
    "generate": ("zipjax.generate", "generate"),
    "generate_image": ("zipjax.image", "generate_image"),
    "generate_stream": ("zipjax.generate", "generate_stream"),
    "kv": ("zipjax.kv", None),
    "load": ("zipjax.checkpoint", "load"),
    "make_mesh": ("zipjax.sharding", "make_mesh"),
}

__all__ = sorted(_EXPORTS)

# public names that are also submodules' names (zipjax.generate): the name means the function, as an eager
# `from zipjax.generate import generate` would leave it, even after the submodule itself is imported
_SHADOWED = frozenset(name for name, (module, attribute) in _EXPORTS.items()
                      if attribute is not None and module == f"{__name__}.{name}")


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = importlib.import_module(module)
        if attribute is not None:
            value = getattr(value, attribute)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # any submodule, as an eager import left it
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: importing a submodule binds it on its package, except over a shadowed public name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
