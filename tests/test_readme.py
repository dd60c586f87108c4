"""The README's task snippets run as written: every code block after a `<!-- readme:run -->` marker is executed,
bash blocks as a shell script and python blocks in order in one namespace, from a folder that looks like the
repository's root (links to checkpoints/ and zipjax/), so nothing is written into the clone. The commands share
this process's compilation cache, so a python block after a command with the same programs reads them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme:run -->"


def snippets() -> list[tuple[str, str]]:
    """(language, code) of every marked block, in README order."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(re.escape(MARKER) + r"\n```(bash|python)\n(.*?)\n```", text, flags=re.S)
    assert len(found) == text.count(MARKER), "every marker must sit right above a bash or python block"
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    for name in ("checkpoints", "zipjax"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def test_the_readme_marks_every_task():
    languages = [language for language, _ in snippets()]
    assert languages.count("bash") >= 5 and languages.count("python") >= 4


def test_the_readme_task_snippets_run(workdir, monkeypatch, capsys):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if jax.config.jax_compilation_cache_dir:  # the commands write their programs where this process reads them:
        env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,  # the python blocks that run
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the same method or decoder load, not compile
    namespace: dict = {}
    monkeypatch.chdir(workdir)
    for language, code in snippets():
        if language == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{code}\n{result.stderr[-3000:]}"
            assert "Traceback" not in result.stderr, code
            unexpected = [line for line in result.stderr.splitlines()  # status lines and progress bars only
                          if line.strip() and not line.startswith(("[", "wrote ", "exported ", "converted "))
                          and "%|" not in line]
            assert not unexpected, f"{code}\n{result.stderr[-3000:]}"
        else:
            exec(compile(code, "README.md", "exec"), namespace)
    assert (workdir / "seven.png").is_file() and (workdir / "stdlib-llama-again" / "zipjax.json").is_file()
    printed = capsys.readouterr().out
    assert "MiB, " in printed and "MiB per expert" in printed
