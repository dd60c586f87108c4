"""Hostile and careless input: no code from a checkpoint runs, nothing a user owns is deleted, every error is one
line. The hostile files (code-carrying tokenizers, escaping links and shard names, bit flips, decompression bombs,
absurd configs) are built here by the tests themselves."""

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from zipjax.convert import convert
from zipjax.convert.export import export_hf

import zipjax
from zipjax import destination
from zipjax.checkpoint import save, verify, write_checksums
from zipjax.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
STDLIB = ROOT / "checkpoints" / "stdlib-llama"
EVIL_CODE = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`zipjax ARGS` in a fresh process, stdin answering "y" to any prompt."""
    return subprocess.run([sys.executable, "-m", "zipjax.cli", *args], capture_output=True, input=b"y\ny\n",
                          timeout=600, **kwargs)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode(errors="replace").strip()
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _with_code_in_tokenizer(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil_tok.py").write_text(EVIL_CODE)


# ------------------------------------------------------------------------------------------ code never runs


def test_a_checkpoint_carrying_tokenizer_code_runs_none_of_it_and_never_prompts(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(STDLIB, ckpt)
    _with_code_in_tokenizer(ckpt)
    write_checksums(ckpt)  # a hostile checkpoint is internally consistent
    result = _cli(["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "3", "def f():"])
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert not (ckpt / "RAN").exists()
    output = (result.stdout + result.stderr).decode().lower()
    assert "custom code" not in output and "[y/n]" not in output


def test_a_tokenizer_only_code_could_build_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(STDLIB, ckpt)
    _with_code_in_tokenizer(ckpt)
    (ckpt / "tokenizer.json").unlink()  # nothing left that transformers can read without the folder's code
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    write_checksums(ckpt)
    line = _one_error_line(_cli(["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "3", "x"]))
    assert "tokenizer" in line
    assert not (ckpt / "RAN").exists()


def test_convert_of_a_folder_with_tokenizer_code_runs_none_of_it(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama_gqa"].hf_dir, src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STDLIB / name, src / name)
    _with_code_in_tokenizer(src)
    result = _cli(["convert", str(src), str(tmp_path / "dst")])
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert not (src / "RAN").exists()
    assert not (tmp_path / "dst" / "evil_tok.py").exists()
    assert zipjax.load(tmp_path / "dst").tokenizer.encode("def")


# ------------------------------------------------------------------------------ nothing the user owns is lost


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tiny_models, tmp_path):
    src = tiny_models["llama_gqa"].hf_dir
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(zipjax.ZipjaxError, match="not a zipjax checkpoint"):
        convert(src, mine, overwrite=True, progress=False)
    assert (mine / "thesis.tex").read_text() == "years of work"
    with pytest.raises(zipjax.ZipjaxError, match="not a folder zipjax exported"):
        export_hf(tiny_models["llama_gqa"].zj_dir, mine, overwrite=True, progress=False)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_an_empty_destination_argument_is_refused_not_the_current_folder(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    for args in (["convert", str(tiny_models["llama_gqa"].hf_dir), "", "--overwrite"],
                 ["export", str(tiny_models["llama_gqa"].zj_dir), "", "--overwrite"],
                 ["convert", str(tiny_models["llama_gqa"].hf_dir), ".", "--overwrite"]):
        assert cli_main(args) == 2, args
        assert (tmp_path / "keep.txt").exists()


# every path argument of every subcommand, with the empty string in its place
EMPTY_PATH_ARGS = [
    ["convert", "{hf}", "", "--overwrite"],
    ["convert", "", "{tmp}/out"],
    ["convert", "{hf}", "{tmp}/out", "--vision-tokenizer", ""],
    ["export", "{zj}", "", "--overwrite"],
    ["export", "", "{tmp}/out"],
    ["experts", "compress", "{zj}", "{zj}", "--out", "", "--overwrite"],
    ["experts", "compress", "", "{zj}", "--out", "{tmp}/bank"],
    ["experts", "compress", "{zj}", "", "--out", "{tmp}/bank"],
    ["experts", "compress", "{zj}", "{zj}", "--out", "{tmp}/bank", "--calibration", ""],
    ["generate", "x", "--checkpoint", ""],
    ["generate", "x", "--checkpoint", "{zj}", "--experts", " "],
    ["generate", "x", "--checkpoint", "{zj}", "--profile", ""],
    ["image", "x", "--checkpoint", ""],
    ["image", "x", "--checkpoint", "{zj}", "--out", ""],
    ["ask", "", "x", "--checkpoint", "{zj}"],
    ["ask", "{tmp}/a.png", "x", "--checkpoint", ""],
    ["verify", ""],
]


@pytest.mark.parametrize("args", EMPTY_PATH_ARGS, ids=lambda a: " ".join(a[:2]) + f" #{EMPTY_PATH_ARGS.index(a)}")
def test_an_empty_path_argument_is_refused_by_every_subcommand(tiny_models, tmp_path, monkeypatch, capsys, args):
    """`zipjax convert SRC "$UNSET" --overwrite` run inside a checkpoint once replaced that checkpoint: an empty
    path is refused before it can become the current folder."""
    tiny = tiny_models["llama_gqa"]
    cwd = tmp_path / "ckpt"
    shutil.copytree(tiny.zj_dir, cwd)
    (cwd / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    monkeypatch.chdir(cwd)
    filled = [a.format(hf=tiny.hf_dir, zj=tiny.zj_dir, tmp=tmp_path) for a in args]
    assert cli_main(filled) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "the path is empty" in err[0], err
    assert sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "bank").exists()


def test_overwrite_never_deletes_files_zipjax_did_not_write(tiny_models, tmp_path):
    """A README beside a checkpoint, a note in an export: --overwrite refuses, naming them, and keeps everything."""
    tiny = tiny_models["llama_gqa"]
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    convert(tiny.hf_dir, ckpt, progress=False)
    export_hf(ckpt, hf, progress=False)
    assert json.loads((hf / destination.EXPORT_MARKER).read_text())["files"]  # the export lists what it wrote
    convert(tiny.hf_dir, ckpt, overwrite=True, progress=False)  # a folder zipjax wrote, alone: replaced
    export_hf(ckpt, hf, overwrite=True, progress=False)
    (ckpt / "README.md").write_text("my notes")
    (ckpt / "params" / "extra.bin").write_bytes(b"mine")
    (hf / "eval.json").write_text("{}")
    with pytest.raises(zipjax.ZipjaxError, match=r"README\.md.*did not write"):
        convert(tiny.hf_dir, ckpt, overwrite=True, progress=False)
    assert cli_main(["convert", str(tiny.hf_dir), str(ckpt), "--overwrite"]) == 2
    with pytest.raises(zipjax.ZipjaxError, match=r"eval\.json"):
        export_hf(tiny.zj_dir, hf, overwrite=True, progress=False)
    assert (ckpt / "README.md").read_text() == "my notes" and (ckpt / "params" / "extra.bin").exists()
    assert (hf / "eval.json").exists() and zipjax.load(ckpt).config == tiny.load().config


@pytest.fixture(scope="module")
def expert_checkpoints(tmp_path_factory, tiny_models):
    """A base checkpoint and two experts fine-tuned from it (perturbed weights)."""
    import jax

    root = tmp_path_factory.mktemp("experts")
    base = tiny_models["llama_gqa"].load()
    save(root / "base", base.config, jax.device_get(base.params))
    for seed, name in enumerate(("a", "b"), start=1):
        rng = np.random.RandomState(seed)
        params = jax.tree.map(lambda x, r=rng: np.asarray(x) + 0.01 * r.standard_normal(x.shape).astype(x.dtype),
                              jax.device_get(base.params))
        save(root / name, base.config, params)
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_experts_compress_never_writes_over_or_into_its_inputs(expert_checkpoints, tmp_path):
    root = tmp_path / "work"
    shutil.copytree(expert_checkpoints, root)
    base, a, b = root / "base", root / "a", root / "b"
    before = {name: _tree(root / name) for name in ("base", "a", "b")}
    compress = ["experts", "compress", str(base), str(a), str(b), "--names", "a", "b", "--overwrite"]
    for out in (root, base, a, base / "params", a / "params" / "d", root / "x" / ".." / "b"):
        assert cli_main([*compress, "--out", str(out)]) == 2, out
    bank = root / "bank"
    assert cli_main([*compress, "--out", str(bank)]) == 0
    shutil.move(str(a), str(bank / "a"))  # an expert kept inside the bank folder is an input too
    with pytest.raises(zipjax.ZipjaxError, match="source"):
        from zipjax.experts.bankfile import check_destination
        check_destination(bank, overwrite=True, sources=[bank / "a"])
    assert cli_main(["experts", "compress", str(base), str(bank / "a"), str(b), "--names", "a", "b",
                     "--overwrite", "--out", str(bank)]) == 2
    shutil.move(str(bank / "a"), str(a))
    assert {name: _tree(root / name) for name in ("base", "a", "b")} == before


def test_experts_compress_overwrite_keeps_a_router_stored_in_the_bank(expert_checkpoints, tmp_path, capsys):
    from zipjax import experts

    root = expert_checkpoints
    bank = tmp_path / "bank"
    compress = ["experts", "compress", str(root / "base"), str(root / "a"), str(root / "b"), "--out", str(bank)]
    assert cli_main(compress) == 0
    (bank / "router.json").write_text('{"format": "zipjax-router"}')
    (bank / "router.npz").write_bytes(b"weights")
    capsys.readouterr()
    assert cli_main([*compress, "--overwrite"]) == 2
    assert "router.json" in capsys.readouterr().err
    assert (bank / "router.npz").read_bytes() == b"weights"
    model = zipjax.load(root / "base")
    loaded = experts.load(bank, model)
    with pytest.raises(zipjax.ZipjaxError, match="router"):  # the API refuses too, before writing anything
        loaded.save(bank, overwrite=True)
    (bank / "router.json").unlink()
    (bank / "router.npz").unlink()
    assert cli_main([*compress, "--overwrite"]) == 0  # a bank alone is replaced


def test_export_and_convert_never_write_over_or_around_their_source(tiny_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama_gqa"].zj_dir, ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    for dst in (ckpt, tmp_path, ckpt / "inside", tmp_path / "x" / ".." / "ckpt"):
        with pytest.raises(zipjax.ZipjaxError, match="source"):
            export_hf(ckpt, dst, overwrite=True, progress=False)
    link = tmp_path / "link"
    link.symlink_to(tiny_models["llama_gqa"].hf_dir)
    for dst in (link, tiny_models["llama_gqa"].hf_dir / ".." / tiny_models["llama_gqa"].hf_dir.name):
        with pytest.raises(zipjax.ZipjaxError, match="source"):
            convert(tiny_models["llama_gqa"].hf_dir, dst, overwrite=True, progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert (tiny_models["llama_gqa"].hf_dir / "config.json").is_file()


def test_overwrite_swaps_in_one_step_and_the_fallback_recovers_after_a_kill(tiny_models, tmp_path, monkeypatch):
    src, dst = tiny_models["llama_gqa"].hf_dir, tmp_path / "dst"
    convert(src, dst, progress=False)
    convert(src, dst, overwrite=True, progress=False)  # renameat2 exchange where available
    zipjax.load(dst)
    # where the filesystem cannot exchange: rename the old aside, then the new in; die in between
    monkeypatch.setattr(destination, "_exchange", lambda a, b: False)
    real_rename = Path.rename

    def dies_between_the_renames(self, target):
        if Path(target) == dst and self.name.startswith(".dst.partial"):
            raise KeyboardInterrupt  # "killed" after the old folder moved aside, before the new one moved in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, overwrite=True, progress=False)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not dst.exists() and list(tmp_path.glob(".dst.old-*"))
    convert(src, tmp_path / "other", progress=False)  # an unrelated write does not touch it
    with pytest.raises(zipjax.ZipjaxError, match="already exists"):  # the next write to dst restores it first
        convert(src, dst, progress=False)
    zipjax.load(dst)
    assert not list(tmp_path.glob(".dst.*"))


def test_stale_staging_folders_of_killed_runs_are_removed(tiny_models, tmp_path):
    stale = tmp_path / ".dst.partial-999999"
    (stale / "params").mkdir(parents=True)
    convert(tiny_models["llama_gqa"].hf_dir, tmp_path / "dst", progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_a_second_writer_to_the_same_destination_is_refused(tiny_models, tmp_path):
    lock = tmp_path / ".dst.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another zipjax process, mid-conversion
        with pytest.raises(zipjax.ZipjaxError, match="another zipjax process is writing"):
            convert(tiny_models["llama_gqa"].hf_dir, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_ctrl_c_during_the_parameter_write_finishes_it_then_cleans_up(tiny_models, tmp_path, monkeypatch, capsys):
    model = tiny_models["llama_gqa"].load()
    import orbax.checkpoint as ocp

    real_wait = ocp.StandardCheckpointer.wait_until_finished

    def interrupted_wait(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while orbax's threads write
        return real_wait(self)

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "dst", model.config, model.params)
    assert "finishing the write in progress" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ resource exhaustion


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny file whose header declares a width x height RGB image (a decompression bomb's shape)."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    body = zlib.compress(b"\0" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 100_000, 100_000)
    assert bomb.stat().st_size < 2000
    line = _one_error_line(_cli(["ask", str(bomb), "what is it?", "--checkpoint", str(tmp_path)]))
    assert "declares" in line and ("100000x100000" in line or "10000000000 pixels" in line)


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**9), ("hidden_size", 10**9),
                                         ("vocab_size", 2**40), ("max_position_embeddings", 10**12)])
def test_absurd_sizes_are_refused_before_anything_is_allocated(tiny_models, tmp_path, field, value):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama_gqa"].hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(zipjax.ZipjaxError, match=field):
        convert(src, tmp_path / "dst", progress=False)


# ------------------------------------------------------------------------------------------ silent wrong results


def test_token_ids_beyond_int32_are_refused_not_wrapped(tiny_models):
    model = tiny_models["llama_gqa"].load()
    for ids in ([[5, 2**32 + 3]], np.array([[5, 2**32 + 3]], np.int64), np.array([[5, 2**63 + 3]], np.uint64)):
        with pytest.raises(zipjax.ZipjaxError, match="must lie in"):
            zipjax.generate(model, ids, 2)
    with pytest.raises(zipjax.ZipjaxError, match="non-integer"):
        zipjax.generate(model, [[5, 2**70]], 2)


@pytest.mark.parametrize("field,value,message", [
    ("tie_word_embeddings", "false", "wrong type"),  # bool("false") would be True
    ("rms_norm_eps", -1e-5, "rms_norm_eps"),
    ("hidden_size", 64.5, "wrong type"),
    ("num_attention_heads", 4.0, "wrong type"),
    ("rope_theta", float("nan"), "finite"),
    ("attention_bias", "yes", "wrong type"),
    ("architectures", [{"name": "LlamaForCausalLM"}], "architectures"),
    ("bos_token_id", 10**6, "bos_token_id"),
    ("eos_token_id", "2", "wrong type"),
])
def test_config_values_of_the_wrong_type_or_range_are_refused(tiny_models, tmp_path, field, value, message):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama_gqa"].hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    if field in config.get("rope_parameters", {}):  # transformers 5 keeps rope_theta there
        config["rope_parameters"][field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(zipjax.ZipjaxError, match=message):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_a_shard_index_cannot_name_files_outside_the_source(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama_gqa"].hf_dir, src)
    (src / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    for name in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": name}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(zipjax.ZipjaxError, match="outside the source folder"):
            convert(src, tmp_path / "dst", progress=False)


def test_a_tokenizer_file_linking_outside_the_model_is_not_copied(tiny_models, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama_gqa"].hf_dir, src)
    (src / "tokenizer.json").symlink_to(secret)
    with pytest.raises(zipjax.ZipjaxError, match="outside the source folder"):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_a_hugging_face_cache_snapshot_with_links_into_blobs_converts(tiny_models, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in tiny_models["llama_gqa"].hf_dir.iterdir():
        shutil.copy(file, blobs / f"hash-{file.name}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"hash-{file.name}")
    convert(snapshot, tmp_path / "dst", progress=False)
    zipjax.load(tmp_path / "dst")


def test_a_bit_flip_in_a_checkpoint_is_caught_at_load_and_by_verify(tiny_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama_gqa"].zj_dir, ckpt)
    assert verify(ckpt) == []
    assert cli_main(["verify", str(ckpt)]) == 0
    data = max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(zipjax.ZipjaxError, match=r"damaged.*SHA-256"):
        zipjax.load(ckpt)
    assert cli_main(["verify", str(ckpt)]) == 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), "finite"), (dict(temperature=float("inf")), "finite"),
    (dict(temperature=1e-310), "too small"), (dict(temperature=1.0, top_p=float("nan")), "finite"),
    (dict(temperature=1.0, top_k=2**40), "top_k"), (dict(seed=2**32 + 5), "seed"), (dict(seed=-1), "seed"),
])
def test_nan_infinite_denormal_or_oversized_sampling_settings_are_refused(tiny_models, kwargs, message):
    model = tiny_models["llama_gqa"].load()
    with pytest.raises(zipjax.ZipjaxError, match=message):
        zipjax.generate(model, [[5, 6]], 2, **kwargs)


def test_image_sampling_settings_are_checked_too(digits_emu3):
    from zipjax.zipar import SJD

    model = digits_emu3
    for kwargs in (dict(cfg_scale=float("nan")), dict(temperature=float("inf")), dict(seed=2**40),
                   dict(decoder=SJD(10**9)), dict(size=5)):
        with pytest.raises(zipjax.ZipjaxError):
            zipjax.generate_image(model, "a digit", **{"size": (16, 16), **kwargs})


# -------------------------------------------------------------------------------- one line, never a traceback


def test_argument_errors_are_one_line(tmp_path):
    for args in (["generate", "--max-new-tokens", "many", "x"], ["image"], ["nonsense"],
                 ["generate", "--temperature", "warm", "x"], ["image", "--size", "big", "x", "--checkpoint", "c"]):
        line = _one_error_line(_cli(args))
        assert "usage:" not in line


def test_cli_errors_are_one_line(tiny_models, tmp_path):
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama_gqa"].zj_dir, broken)
    (broken / "checksums.json").unlink()
    for f in (broken / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    (tmp_path / "file").write_text("x")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    cases = [
        ["convert", str(gguf_dir / "model.gguf"), str(tmp_path / "out")],
        ["convert", str(tiny_models["llama_gqa"].hf_dir), str(tmp_path / "file" / "sub")],
        ["generate", "--checkpoint", str(broken), "x"],
        ["generate", "--checkpoint", str(STDLIB), "--seed", str(2**70), "x"],
        ["generate", "--checkpoint", str(STDLIB), "--top-k", str(2**40), "--temperature", "1", "x"],
        ["ask", str(tmp_path / "junk.png"), "q", "--checkpoint", str(tmp_path)],
        ["ask", str(tmp_path / "missing.png"), "q", "--checkpoint", str(tmp_path)],
        ["image", "x", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "no" / "such" / "x.png")],
        ["image", "x", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.jpg")],
        ["verify", str(tmp_path)],
    ]
    for args in cases:
        _one_error_line(_cli(args))


def test_a_non_utf8_prompt_is_one_error_line_and_the_prompt_is_not_echoed_first():
    result = subprocess.run([sys.executable, "-m", "zipjax.cli", "generate", "--checkpoint", str(STDLIB),
                             b"caf\xe9 \xff"], capture_output=True, timeout=600)
    assert "not valid UTF-8" in _one_error_line(result)
    result = _cli(["generate", "--checkpoint", str(STDLIB), "--temperature", "nan", "PROMPT-TEXT"])
    _one_error_line(result)
    assert b"PROMPT-TEXT" not in result.stdout


def test_a_closed_pipe_ends_quietly():
    result = subprocess.run(f"{sys.executable} -m zipjax.cli generate --checkpoint {STDLIB} --max-new-tokens 60 "
                            f"'def f():' | head -c 5", shell=True, capture_output=True, timeout=600)
    assert result.stdout == b"def f"
    assert b"Traceback" not in result.stderr and b"Broken pipe" not in result.stderr


def test_a_pickle_refusal_never_suggests_unsafe_loading(tiny_models, tmp_path):
    import pickle

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama_gqa"].hf_dir, src)
    (src / "model.safetensors").unlink()
    for write in (lambda f: torch.save({"model.embed_tokens.weight": Payload()}, f),  # the zip format
                  lambda f: f.write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))):  # legacy
        write(src / "pytorch_model.bin")
        result = _cli(["convert", str(src), str(tmp_path / "dst")])
        line = _one_error_line(result)
        assert "weights_only=False" not in result.stderr.decode() and "never runs pickled code" in line
        assert not (tmp_path / "PWNED").exists()


def test_os_errors_about_the_users_paths_are_one_line(tiny_models, tmp_path):
    digits = ROOT / "checkpoints" / "digits-emu3"
    (tmp_path / "full.png").symlink_to("/dev/full")  # every write fails with "No space left on device"
    line = _one_error_line(_cli(["image", "a digit", "--checkpoint", str(digits), "--size", "16x16",
                                 "--out", str(tmp_path / "full.png")]))
    assert "No space left on device" in line
    line = _one_error_line(_cli(["convert", str(tiny_models["llama_gqa"].hf_dir), "/proc/zipjax-test/dst"]))
    assert "/proc/zipjax-test" in line
