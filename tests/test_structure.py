"""The package's shape: every module imports alone, imports only go downward (no cycle), kernels import nothing of
zipjax but their own leaf, no library function is over 60 lines, and the only top-level import name is `zipjax`.

Imports are read from the source (module level and inside functions alike), so a cycle hidden in a function body
counts too.
"""

import ast
import subprocess
import sys
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
    assert not any(d.startswith(("zipjax.zipar", "zipjax.emu3.image", "zipjax.emu3.sequential")) for d in decoding)


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
        small = kv.method_from_name(name, **({"window": 8} if "window" in inspect.signature(cls).parameters else {}))
        assert isinstance(small.decode_slots, int) and small.decode_slots >= 0
        small.check(config, 2, 64, 16)
        cache = jax.eval_shape(lambda m=small: m.make_cache(config, 2, 64, 16))
        assert isinstance(cache, Cache) and cache.max_len == 64, name
    with pytest.raises(ZipjaxError, match="no KV method named 'zipcash'"):
        kv.method_from_name("zipcash")
