"""The package's shape: every module imports alone, imports only go downward (no cycle), kernels import nothing of
zipjax but their own leaf, no library function is over 60 lines, the only top-level import name is `zipjax`, every
package folder is installed, and the library never imports the harness wing (zipjax.harness).

Imports are read from the source (module level and inside functions alike), so a cycle hidden in a function body
counts too.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package name (pyproject.toml's package-dir)
PACKAGES = {"zipjax": "zipjax", "convert": "zipjax.convert", "pallas_kernels": "zipjax.kernels"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """zipjax modules imported anywhere in the file (a `from package import name` counts as the submodule when
    `name` is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_the_source_folders_are_the_installed_packages():
    assert "zipjax.kernels.common" in MODULES and "zipjax.convert.gguf" in MODULES
    assert len(MODULES) > 40


def test_every_package_folder_is_installed():
    """pyproject.toml's [tool.setuptools] packages list names every folder of the source that holds an __init__.py
    (a package left out is missing from the wheel while the editable install still finds it)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert folders == listed, f"not installed: {sorted(folders - listed)}; no such folder: {sorted(listed - folders)}"


def test_import_graph_has_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_kernels_import_nothing_of_zipjax_but_their_leaf():
    """Besides their own package, kernels may import the platform switch (zipjax.platform, a leaf of the stdlib)."""
    for name, deps in _graph().items():
        if name.startswith("zipjax.kernels."):
            outside = {d for d in deps if not d.startswith("zipjax.kernels") and d != "zipjax.platform"}
            assert not outside, f"{name} imports {sorted(outside)}"
    assert _graph()["zipjax.kernels.common"] == {"zipjax.platform"}, "the kernels' leaf imports the switch only"
    assert _graph()["zipjax.platform"] == set(), "the platform switch imports no zipjax module"


def test_leaves_stay_leaves():
    """The contract modules at the bottom of each subsystem import only what is below them."""
    graph = _graph()
    allowed = {
        "zipjax.errors": set(),
        "zipjax.shapes": set(),
        "zipjax.cache": {"zipjax.errors"},
        "zipjax.attention": {"zipjax.kernels.common", "zipjax.kernels.flash_attention", "zipjax.sharding"},
        "zipjax.kv.codec": {"zipjax.kernels.common"},
        "zipjax.zipar.schedule": {"zipjax.errors"},
        "zipjax.zipar.acceptance": set(),
    }
    for name, deps in allowed.items():
        assert graph[name] <= deps, f"{name} imports {sorted(graph[name] - deps)}"
    decoding = graph["zipjax.emu3.decoding"]
    assert not any(d.startswith(("zipjax.zipar", "zipjax.image", "zipjax.emu3.sequential")) for d in decoding)


# Imports every module named on stdin in its own process, forked from one that holds the heavy third-party
# libraries but no zipjax module, so each child imports its module exactly as a fresh interpreter would (only the
# third-party part, which cannot take part in a zipjax cycle, is shared).
_FORK_IMPORTER = """
import os, sys, traceback
import flax.linen, jax, jax.numpy, numpy, orbax.checkpoint, PIL.Image, safetensors, tqdm  # third party only
assert not [m for m in sys.modules if m.split(".")[0] == "zipjax"]
failures = []
for module in sys.stdin.read().split():
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            sys.stderr.write(module + ": " + traceback.format_exc().strip().splitlines()[-1] + "\\n")
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failures.append(module)
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_alone_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-c", _FORK_IMPORTER], input="\n".join(sorted(MODULES)),
                            capture_output=True, text=True, cwd="/", timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]


def test_a_kernel_module_imports_alone_in_a_fresh_interpreter():
    """The failure the issue found (a half-loaded kernel module), in a truly fresh interpreter."""
    for module in ("zipjax.kernels.quantized_attention", "zipjax.kernels.zipar_attention"):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd="/")
        assert result.returncode == 0, result.stderr[-2000:]


def test_only_zipjax_is_a_top_level_import_name():
    for generic in ("convert", "pallas_kernels"):
        result = subprocess.run([sys.executable, "-c", f"import {generic}"], capture_output=True, text=True, cwd="/")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, generic


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_no_library_function_is_over_60_lines(folder):
    long = [f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
            for path in sorted((ROOT / folder).rglob("*.py")) for name, line, n in _functions(path)
            if n > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_image_generation_sits_above_the_model_and_the_decoders():
    """zipjax.emu3 (the model, the decoding contract, the sequential decoder) reaches nothing of zipjax.zipar (the
    parallel decoders), not even through another module; `generate_image` is defined in zipjax.image alone, which
    imports both packages and which neither reaches."""
    graph = _graph()
    for name in graph:
        if _in_package(name, "zipjax.emu3"):
            up = {d for d in _reachable(graph, name) if _in_package(d, "zipjax.zipar")}
            assert not up, f"{name} reaches {sorted(up)}"
        if _in_package(name, "zipjax.emu3") or _in_package(name, "zipjax.zipar"):
            assert "zipjax.image" not in _reachable(graph, name), f"{name} reaches zipjax.image"
    defined_in = [name for name, path in MODULES.items() for node in ast.parse(path.read_text()).body
                  if isinstance(node, ast.FunctionDef) and node.name == "generate_image"]
    assert defined_in == ["zipjax.image"]
    image = graph["zipjax.image"]
    assert any(_in_package(d, "zipjax.emu3") for d in image) and any(_in_package(d, "zipjax.zipar") for d in image)


def test_the_core_imports_nothing_of_the_experts():
    """ME-Switch plugs into the model through the zipjax.deltas contract (a leaf) and `Model.deltas`: generation, the
    model and the transformer name no module of zipjax.experts (issue 21)."""
    graph = _graph()
    assert graph["zipjax.deltas"] == set(), "the weight-delta contract is a leaf"
    for name in ("zipjax.generate", "zipjax.transformer", "zipjax.model", "zipjax.deltas"):
        experts = sorted(d for d in graph[name] if d.startswith("zipjax.experts"))
        assert not experts, f"{name} imports {experts}"


def test_the_model_blocks_are_named_scopes():
    """Profiles show named regions: the lowered forward carries each block's `jax.named_scope` in its locations
    (the modules' from flax, the regions inside them from zipjax.transformer)."""
    import jax
    import jax.numpy as jnp

    from zipjax.config import ModelConfig
    from zipjax.transformer import Transformer, abstract_params

    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=32)
    tokens = jnp.zeros((1, 4), jnp.int32)
    forward = jax.jit(lambda params, t: Transformer(config).apply({"params": params}, t, t)[0])
    text = forward.lower(abstract_params(config), tokens).as_text(debug_info=True)
    for scope in ("embed", "layer_0/attn_norm", "layer_0/attn/qkv", "layer_0/attn/attention", "layer_0/attn/attn_out",
                  "layer_0/mlp_norm", "layer_0/mlp", "final_norm", "lm_head"):  # modules: flax's own named scopes
        assert f"/{scope}/" in text, f"no named scope {scope!r} in the lowered forward"

# the kernels' entry points: one wrapper convention, `name(..., *, backend=None, interpret=None, blocks=None)`
KERNEL_ENTRY_POINTS = {
    "zipjax.kernels.flash_attention": ("flash_attention", "flash_attention_state", "flash_prefill", "flash_decode"),
    "zipjax.kernels.zipar_attention": ("zipar_attention",),
    "zipjax.kernels.quantized_attention": ("segment_attention",),
    "zipjax.kernels.quantized_multi_query": ("multi_query_attention",),
    "zipjax.kernels.paged_packed_attention": ("paged_packed_attention",),
    "zipjax.kernels.paged_dense_attention": ("paged_dense_attention",),
    "zipjax.kernels.delta_matmul": ("delta_matmul",),
}


@pytest.mark.parametrize("module", list(KERNEL_ENTRY_POINTS))
def test_every_kernel_wrapper_has_the_one_signature(module):
    """Keyword-only backend, interpret and blocks, all defaulting to None; blocks a frozen `Blocks` record of the
    kernel's own module that checks itself; no *args / **kwargs, no use_kernel; a named_scope for profiles. Every
    public function that takes `interpret` is an entry point listed here; the static plan of a call is `Tiling` and
    the input check `check_inputs` in every kernel module."""
    import dataclasses
    import importlib
    import inspect

    kernel = importlib.import_module(module)
    blocks = kernel.Blocks
    assert dataclasses.is_dataclass(blocks) and blocks.__dataclass_params__.frozen and "__post_init__" in vars(blocks)
    assert dataclasses.is_dataclass(kernel.Tiling) and callable(kernel.check_inputs)  # one name for each part
    wrappers = {name for name, fn in vars(kernel).items() if inspect.isfunction(fn) and not name.startswith("_")
                and fn.__module__ == module and "interpret" in inspect.signature(fn).parameters}
    assert wrappers == set(KERNEL_ENTRY_POINTS[module])
    for name in wrappers:
        fn = getattr(kernel, name)
        params = inspect.signature(fn).parameters
        for option in ("backend", "interpret", "blocks"):
            assert params[option].kind is inspect.Parameter.KEYWORD_ONLY and params[option].default is None, name
        assert "Blocks" in str(params["blocks"].annotation), name
        kinds = {p.kind for p in params.values()}
        assert not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}, name
        assert "use_kernel" not in params, name
        assert "jax.named_scope(" in inspect.getsource(fn) or name in ("flash_prefill", "flash_decode"), name


@pytest.mark.parametrize("module", list(KERNEL_ENTRY_POINTS))
def test_kernels_mask_with_the_one_mask_value(module):
    """No -inf masks: every kernel masks with zipjax.kernels.common.MASK_VALUE (through its online-softmax step)."""
    source = MODULES[module].read_text()
    assert "jnp.inf" not in source and "float(\"-inf\")" not in source


def _closure(module: str) -> set[str]:
    """The module, every zipjax module it imports (transitively) and their packages."""
    graph, seen, todo = _graph(), set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return {".".join(name.split(".")[:i]) for name in seen for i in range(1, name.count(".") + 2)}


@pytest.mark.parametrize("module", [*KERNEL_ENTRY_POINTS, "zipjax.kernels.common", "zipjax.cache"])
def test_importing_one_module_loads_only_what_it_names(module):
    """`zipjax/__init__.py` is lazy: importing a kernel (or the leaf zipjax.cache) in a fresh interpreter loads the
    package, the platform switch it runs first, and the module's own imports, nothing else of zipjax."""
    code = f"import sys, {module}; print(*sorted(m for m in sys.modules if m.split('.')[0] == 'zipjax'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(result.stdout.split())
    assert loaded == _closure(module) | {"zipjax", "zipjax.platform"}, module
    if module.startswith("zipjax.kernels."):
        assert all(m in ("zipjax", "zipjax.platform") or m.startswith("zipjax.kernels") for m in loaded), loaded

def test_the_kv_factory_asks_the_method_and_tests_no_type():
    """zipjax/kv/methods.py builds a cache by asking the method (`check`, `decode_slots`, `make_cache`): no
    isinstance / issubclass / type() call, no `__class__`, no class pattern in a `match`."""
    tree = ast.parse(MODULES["zipjax.kv.methods"].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "isinstance", "issubclass", "type"):
            found.append(f"line {node.lineno}: {node.func.id}()")
        elif isinstance(node, ast.Attribute) and node.attr == "__class__":
            found.append(f"line {node.lineno}: .__class__")
        elif isinstance(node, ast.MatchClass):
            found.append(f"line {node.lineno}: match on a class")
    assert not found, "type tests in the KV factory:\n" + "\n".join(found)


def test_every_registered_kv_method_implements_the_protocol():
    """Each method in zipjax.kv.METHODS: in the file named after it, a hashable `Method` whose `check` and
    `make_cache` take the protocol's parameters, `kernel: bool | None = None`, refused by name without a kernel, and
    a `make_cache` that gives a `Cache` (traced abstractly: nothing is allocated)."""
    import inspect

    import jax

    from zipjax import kv
    from zipjax.cache import Cache
    from zipjax.config import ModelConfig
    from zipjax.errors import ZipjaxError
    from zipjax.kv.method import Method

    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=128, intermediate_size=128, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=128, dtype="float32")
    assert set(kv.METHODS) == {"zipcache", "kivi", "uniform", "zipvl", "minicache"}
    parameters = lambda f: list(inspect.signature(f).parameters)
    for name, cls in kv.METHODS.items():
        method = kv.method_from_name(name)
        assert cls.name == name and cls.__module__ == f"zipjax.kv.{name}", cls
        assert isinstance(method, Method) and method == cls() and hash(method) == hash(cls())
        for member in ("check", "make_cache"):
            assert parameters(getattr(cls, member)) == parameters(getattr(Method, member)), (name, member)
        assert inspect.signature(cls).parameters["kernel"].default is None, name
        if cls.has_kernel:
            assert kv.method_from_name(name, kernel=True).kernel is True
        else:
            with pytest.raises(ZipjaxError, match=f"{cls.__name__} has no Pallas kernel"):
                kv.method_from_name(name, kernel=True)
        small = kv.method_from_name(name, **({"buffer_len": 8} if "buffer_len" in inspect.signature(cls).parameters
                                             else {}))
        assert isinstance(small.decode_slots, int) and small.decode_slots >= 0
        small.check(config, 2, 64, 16)
        cache = jax.eval_shape(lambda m=small: m.make_cache(config, 2, 64, 16))
        assert isinstance(cache, Cache) and cache.max_len == 64, name
    with pytest.raises(ZipjaxError, match="no KV method named 'zipcash'"):
        kv.method_from_name("zipcash")


# Harness modules the library may name, and where: the `zipjax experts router` command trains a router with
# zipjax.harness.router_training inside its run function; zipjax.experts.finetune is the deprecated alias (one
# release) of zipjax.harness.finetune, which the README named.
HARNESS_USES = {"zipjax.cli": {"zipjax.harness.router_training"},
                "zipjax.experts.finetune": {"zipjax.harness.finetune"}}


def _harness(name: str) -> bool:
    return _in_package(name, "zipjax.harness")


def test_the_library_imports_nothing_of_the_harness():
    """No module outside zipjax.harness imports it, module level or inside a function, beyond HARNESS_USES; the CLI's
    uses sit inside `run_*` functions (loaded when that command runs), and no library module reaches the deprecated
    alias. The harness itself imports the library."""
    graph = _graph()
    for name, deps in graph.items():
        if not _harness(name):
            used = {d for d in deps if _harness(d)}
            assert used <= HARNESS_USES.get(name, set()), f"{name} imports {sorted(used)}"
    assert not [name for name, deps in graph.items() if "zipjax.experts.finetune" in deps], "the alias is unused"
    cli = ast.parse(MODULES["zipjax.cli"].read_text())
    for node in cli.body:  # module level: no harness import
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(_harness(n or "") for n in names), ast.unparse(node)
    for function in (n for n in ast.walk(cli) if isinstance(n, ast.FunctionDef)):
        if any(isinstance(n, ast.ImportFrom) and _harness(n.module or "") for n in ast.walk(function)):
            assert function.name.startswith("run_"), function.name
    harness = [name for name in MODULES if _harness(name) and name != "zipjax.harness"]
    assert len(harness) >= 5 and all(any(not _harness(d) for d in graph[name]) for name in harness), harness
    assert graph["zipjax.harness"] == set(), "the wing's __init__ imports none of its modules"


def test_importing_the_library_loads_no_harness_module():
    """In a fresh interpreter, the library's packages and the CLI load nothing of zipjax.harness."""
    code = ("import sys, zipjax.cli, zipjax.experts, zipjax.experts.router, zipjax.image, zipjax.kv, zipjax.zipar; "
            "print(*sorted(m for m in sys.modules if m.startswith(('zipjax.harness', 'zipjax.experts.finetune'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == []
