"""Hostile input, round 2, the runtime classes: memory a KV cache would take is estimated and refused before any
allocation, files that could block or never end are refused by kind, a closed stdout and a full disk are one line,
and a method's settings are never coerced (True is not 1, 2.0 is not a bit width)."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import zipjax
from zipjax import kv
from zipjax.cli import main

ROOT = Path(__file__).resolve().parents[1]
STDLIB = ROOT / "checkpoints" / "stdlib-llama"


@pytest.fixture(scope="module")
def model():
    return zipjax.load(STDLIB)


def test_a_cache_that_cannot_fit_is_refused_before_allocation(model):
    ids = model.tokenizer.encode("def f(x):")
    with pytest.raises(zipjax.ZipjaxError, match=r"kivi KV cache .* GiB per device, more than"):
        zipjax.generate(model, [ids], 4, kv=kv.KIVI(residual=10**9))
    huge = zipjax.Model(dataclasses.replace(model.config, max_position_embeddings=2**24), model.params)
    with pytest.raises(zipjax.ZipjaxError, match="dense KV cache of 1 x 16000128 slots"):
        zipjax.generate(huge, [ids], 16_000_000)


def test_free_memory_counts_the_address_space_limit():
    """Under `ulimit -v` (RLIMIT_AS) the room left in the process's address space is what it can allocate, however
    much the machine has free: a 3.5 GiB cache is refused by name, not tried (a RESOURCE_EXHAUSTED traceback)."""
    code = ("import dataclasses, resource\nresource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "import zipjax\nfrom zipjax.platform import free_memory_bytes\n"
            f"model = zipjax.load({str(STDLIB)!r})\n"
            "huge = zipjax.Model(dataclasses.replace(model.config, max_position_embeddings=2**24), model.params)\n"
            "assert free_memory_bytes() < 4 << 30, free_memory_bytes()\n"
            "try:\n    zipjax.generate(huge, [[5, 6, 7]], 2**20)\n"
            "except zipjax.ZipjaxError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"the dense KV cache of 1 x \d+ slots.* more than the [0-3]\.\d\d GiB free; .*\n",
                        result.stdout), result.stdout


def test_an_image_decode_that_cannot_fit_is_refused_before_allocation(digits_emu3, monkeypatch):
    """The decoders' caches (the scatter cache of ZipAR and SJD, SJD's drafts, the sequential cache, dense or
    compressed) are estimated from shapes, with guidance doubling the sequences, and refused against free memory."""
    from zipjax.image import Sequential
    from zipjax.zipar import SJD, AdaptiveWindow, FixedWindow

    model = dataclasses.replace(digits_emu3, config=dataclasses.replace(digits_emu3.config,
                                                                        max_position_embeddings=2**24))
    start = time.perf_counter()
    with pytest.raises(zipjax.ZipjaxError, match=r"4000x4000 codes with FixedWindow .* GiB per device, more than"):
        zipjax.generate_image(model, "7", size=(4000, 4000), decoder=FixedWindow(4))  # ~2 TB: no machine's
    assert time.perf_counter() - start < 60
    monkeypatch.setattr("zipjax.kv.methods.free_memory_bytes", lambda: 64 << 20)
    for decoder in (Sequential(), Sequential(kv=kv.KIVI()), FixedWindow(4), AdaptiveWindow(4), SJD(8)):
        needs = []
        for cfg_scale in (3.0, 1.0):
            with pytest.raises(zipjax.ZipjaxError, match=f"512x512 codes with {type(decoder).__name__}") as refused:
                zipjax.generate_image(model, "7", size=(512, 512), decoder=decoder, cfg_scale=cfg_scale)
            needs.append(float(re.search(r"needs ([0-9.]+) GiB", str(refused.value)).group(1)))
            assert ("cfg_scale 1" in str(refused.value)) == (cfg_scale != 1.0)
        assert 1.9 < needs[0] / needs[1] < 2.1, (decoder, needs)  # the unconditional half doubles the caches


def test_image_command_with_a_huge_size_is_one_line(tmp_path, capsys):
    """`zipjax image --size` on a checkpoint whose config allows that many positions: refused by the estimate."""
    import json
    import shutil

    folder = tmp_path / "emu3"
    shutil.copytree(ROOT / "checkpoints" / "digits-emu3", folder)
    (folder / "checksums.json").unlink()  # the manifest is edited below
    manifest = json.loads((folder / "zipjax.json").read_text())
    manifest["config"]["max_position_embeddings"] = 2**24
    (folder / "zipjax.json").write_text(json.dumps(manifest))
    args = ["image", "7", "--checkpoint", str(folder), "--size", "4000x4000", "--zipar-window", "4",
            "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.match(r"error: decoding 1 image\(s\) of 4000x4000 codes .* GiB free", err[0]), err
    assert not (tmp_path / "x.png").exists()


def test_asking_about_an_image_estimates_the_answer_cache(digits_emu3):
    from zipjax.emu3.understand import ask

    model = dataclasses.replace(digits_emu3, config=dataclasses.replace(digits_emu3.config,
                                                                        max_position_embeddings=2**24))
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(zipjax.ZipjaxError, match=r"dense KV cache of 1 x \d+ slots.* GiB per device, more than"):
        ask(model, image, "which digit?", max_new_tokens=16_000_000)


@pytest.mark.parametrize("method, field, value", [
    (kv.ZipCache, "saliency_ratio", True), (kv.ZipCache, "high_bits", 4.0), (kv.ZipCache, "low_bits", "2"),
    (kv.KIVI, "bits", True), (kv.KIVI, "group", True), (kv.KIVI, "residual", 128.0), (kv.Uniform, "bits", 2.0),
    (kv.ZipVL, "evict", 1), (kv.ZipVL, "tau", "0.9"), (kv.MiniCache, "t", True), (kv.MiniCache, "merge_decode", 0)])
def test_method_settings_are_never_coerced(method, field, value):
    with pytest.raises(zipjax.ZipjaxError, match=f"{method.__name__}.{field} has the wrong type"):
        method(**{field: value})


def test_files_that_block_or_never_end_are_refused_by_kind(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    signal.alarm(120)  # a regression would block on the pipe: fail instead of hanging the suite
    try:
        for args in (["generate", "--prompts", str(fifo)], ["generate", "--prompts", "/dev/zero"],
                     ["experts", "compress", str(STDLIB), str(STDLIB), "--names", "a", "--out", str(tmp_path / "b"),
                      "--calibration", str(fifo)],
                     ["experts", "compress", str(STDLIB), str(STDLIB), "--names", "a", "--out", str(tmp_path / "b"),
                      "--calibration", "/dev/zero"]):
            assert main(args) == 2, args
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "not a regular file" in err[0], err
    finally:
        signal.alarm(0)


def test_a_closed_stdout_is_one_line():
    command = f"exec {sys.executable} -m zipjax.cli generate x --max-new-tokens 2 >&-"
    result = subprocess.run(["bash", "-c", command], stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: standard output is closed; zipjax writes its results there"


def test_a_full_disk_during_export_is_one_line(tmp_path):
    """A file-size limit stands in for a full disk: the write fails with the operating system's error inside
    safetensors, which reports it as its own exception type."""
    code = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\nfrom zipjax.cli import main\n"
            f"sys.exit(main(['export', {str(STDLIB)!r}, {str(tmp_path / 'hf')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and errors == [f"error: File too large: {tmp_path / 'hf'}"], result.stderr
    assert not (tmp_path / "hf").exists()


def _with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """`zipjax ARGS` in a child whose files may not grow past `limit` bytes: a disk that fills midway through a
    write the free-space check let through (SIGXFSZ ignored, so the write fails with EFBIG as on a full disk)."""
    code = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\nfrom zipjax.cli import main\n"
            f"sys.exit(main({args!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stdlib_hf(tmp_path_factory) -> Path:
    """The shipped checkpoint as a Hugging Face folder: 56 tensors, enough for orbax to have writes in flight on
    several threads when one fails (a tiny model's few writes often finish before the failure is seen)."""
    from zipjax.convert.export import export_hf

    return export_hf(STDLIB, tmp_path_factory.mktemp("stdlib") / "hf", progress=False)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["convert", "experts compress", "export"])
def test_a_disk_that_fills_during_the_write_is_one_line_and_keeps_the_old_folder(tiny_models, stdlib_hf, tmp_path,
                                                                                 command):
    """Whatever writes (orbax's threads, numpy's zip writer, safetensors), the user sees one line naming the
    destination, no thread's traceback; the folder it was to replace is untouched and nothing else is left."""
    tiny = tiny_models["llama_gqa"]
    dst = tmp_path / "out"
    args = {"convert": ["convert", str(stdlib_hf), str(dst), "--overwrite"],
            "experts compress": ["experts", "compress", str(tiny.zj_dir), str(tiny.zj_dir), "--names", "a",
                                 "--out", str(dst), "--overwrite"],
            "export": ["export", str(tiny.zj_dir), str(dst), "--overwrite"]}[command]
    assert main(args) == 0  # the old content, written without a limit
    before = _tree(dst)
    result = _with_file_size_limit(args, 20_000)
    err = [line for line in result.stderr.splitlines() if "%|" not in line and line.strip()]
    assert result.returncode == 2 and err == [f"error: File too large: {dst}"], result.stderr
    assert _tree(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no lock left


def test_a_disk_too_full_for_the_write_is_refused_before_writing(tiny_models, tmp_path, monkeypatch, capsys):
    """A full disk is found before the write starts (inside orbax's threads it would fail with their tracebacks)."""
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr("zipjax.destination.shutil.disk_usage",
                        lambda path: real(path)._replace(free=1000))
    tiny = tiny_models["llama_gqa"]
    for args in (["convert", str(tiny.hf_dir), str(tmp_path / "ck")],
                 ["export", str(tiny.zj_dir), str(tmp_path / "hf")]):
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line and line.strip()]
        assert len(err) == 1 and err[0].startswith("error:") and "GiB free" in err[0], err
        assert not any(tmp_path.iterdir())
