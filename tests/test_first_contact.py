"""What a newcomer meets first: a quiet normal run, one line per error whatever the import order, a compilation
cache that persists between runs, --version."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "zipjax.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_the_main_job_prints_only_its_output_and_status_line(tmp_path):
    result = _run(["generate", "def fibonacci(n):", "--max-new-tokens", "4"],
                  env={"ZIPJAX_COMPILATION_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")
    foreign = [line for line in result.stderr.splitlines() if not line.startswith("[")]
    assert not foreign, result.stderr
    assert any((tmp_path / "cache").iterdir()), "the compiled programs persist for the next run"


def test_a_bad_flag_is_one_line_and_nothing_else():
    result = _run(["generate", "x", "--max-new-tokens", "lots"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:"), result.stderr


def test_the_compilation_cache_can_be_turned_off(tmp_path):
    code = ("import jax, zipjax; print(jax.config.jax_compilation_cache_dir)")
    assert _run([], code=code, env={"ZIPJAX_COMPILATION_CACHE": "0"}).stdout.strip() == "None"
    chosen = _run([], code=code, env={"ZIPJAX_COMPILATION_CACHE": str(tmp_path)}).stdout.strip()
    assert chosen == str(tmp_path)
    mine = _run([], code=code, env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")}).stdout.strip()
    assert mine == str(tmp_path / "mine")  # a cache the user gave jax is left alone


def test_importing_jax_first_gives_no_traceback_and_aot_still_finds_the_cuda_plugin():
    code = ("import jax\nimport zipjax\nfrom zipjax import aot\nprint(jax.devices()[0].platform)\n"
            "print(aot.target('h100').chip.name)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() [:1] == ["cpu"] and "H100" in result.stdout
    assert "Traceback" not in result.stderr and "plugin configuration error" not in result.stderr, result.stderr


def test_version():
    result = _run(["--version"])
    assert result.returncode == 0 and result.stdout.startswith("zipjax ")
