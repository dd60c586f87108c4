"""Hostile files, round 2: manifests, expert banks, routers, GGUF headers, chat templates, checksum records and
image paths crafted here, small, each refused with one line naming the problem, in bounded time, and (the memory
bombs, run in a subprocess under an address-space limit) in bounded memory."""

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import zipjax
from zipjax import experts
from zipjax.checkpoint import verify, write_checksums
from zipjax.cli import main as cli_main
from zipjax.experts.bankfile import _sha256
from zipjax.experts.router import Router

ROOT = Path(__file__).resolve().parents[1]
STDLIB = ROOT / "checkpoints" / "stdlib-llama"
EXPERTS = ROOT / "checkpoints" / "stdlib-experts"
DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def base():
    return zipjax.load(STDLIB)


def _one_line(capsys, args: list[str]) -> str:
    """`zipjax ARGS` in this process: exit code 2 and one `error:` line on stderr; that line and what went to
    stdout (`verify` lists its problems there)."""
    capsys.readouterr()
    start = time.monotonic()
    assert cli_main(args) == 2, args
    assert time.monotonic() - start < 30
    out, err = capsys.readouterr()
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err + "\n" + out


def _refused(call, match: str) -> str:
    start = time.monotonic()
    with pytest.raises(zipjax.ZipjaxError, match=match) as info:
        call()
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "\n" not in message and "allow_pickle" not in message, message
    return message


# --------------------------------------------------------------------------------- manifests: one bounded reader


def _bank(tmp_path) -> Path:
    bank = tmp_path / "bank"
    shutil.copytree(EXPERTS / "bank", bank)
    return bank


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_deeply_nested_json_is_one_line_in_every_manifest(tmp_path, base, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(STDLIB, ckpt)
    (ckpt / "checksums.json").write_text(DEEP)
    assert "nests JSON" in _refused(lambda: zipjax.load(ckpt), "damaged")
    assert "nests JSON" in _one_line(capsys, ["verify", str(ckpt)])
    (ckpt / "zipjax.json").write_text(DEEP)
    _refused(lambda: zipjax.load(ckpt), "nests JSON")
    bank = _bank(tmp_path)
    (bank / "bank.json").write_text(DEEP)
    _refused(lambda: experts.load(bank, base), "nests JSON")
    router = tmp_path / "router"
    router.mkdir()
    shutil.copy(EXPERTS / "router.npz", router)
    (router / "router.json").write_text(DEEP)
    _refused(lambda: Router.load(router), "nests JSON")


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_a_version_is_an_integer_not_something_equal_to_one(tmp_path, base, version):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(STDLIB, ckpt)
    (ckpt / "checksums.json").unlink()
    _edit(ckpt / "zipjax.json", lambda m: m.update(version=version))
    _refused(lambda: zipjax.load(ckpt), "format version")
    bank = _bank(tmp_path)
    _edit(bank / "bank.json", lambda m: m.update(version=version))
    _refused(lambda: experts.load(bank, base), "format version")


# ------------------------------------------------------------------------------------ expert banks: the manifest


def _field(key, value):
    return lambda m: m.update({key: value})


def _site(change):
    return lambda m: change(m["sites"])


BANK_MANIFESTS = {
    "sites of the wrong type": (_field("sites", ["layer_0/attn/q"]), "sites"),
    "int names": (_field("names", [1, 2, 3]), "names"),
    "null name": (_field("names", ["prose", None, "tests"]), "names"),
    "duplicate names": (_field("names", ["prose", "prose", "tests"]), "more than once"),
    "auto as a name": (_field("names", ["prose", "auto", "tests"]), "auto"),
    "infinite bits": (_field("bits", float("inf")), "bits"),
    "float bits": (_field("bits", 2.9), "bits"),
    "bool bits": (_field("bits", True), "bits"),
    "negative bits": (_field("bits", -3), "bits"),
    "string bits": (_field("bits", "2"), "bits"),
    "empty widths": (_site(lambda s: s["layer_0/attn/q"].update(widths=[])), "widths"),
    "widths unlike the bits": (_site(lambda s: s["layer_0/attn/q"].update(widths=[4])), "widths"),
    "a missing norm": (lambda m: m["norms"].pop(), "norms"),
    "a missing site": (_site(lambda s: s.pop("embed")), "sites differ"),
    "a record of another file": (lambda m: m["arrays"].update(file="../../etc/passwd"), "arrays names"),
}


@pytest.mark.parametrize("case", list(BANK_MANIFESTS))
def test_bank_manifest_fields_are_checked_by_type_and_range(tmp_path, base, case):
    change, match = BANK_MANIFESTS[case]
    bank = _bank(tmp_path)
    _edit(bank / "bank.json", change)
    _refused(lambda: experts.load(bank, base), match)


# ------------------------------------------------------------------------------------ expert banks: the arrays


def _npy(array: np.ndarray, shape=None, descr=None) -> bytes:
    """An npy file of `array`, its header optionally claiming another shape or dtype (the data stays)."""
    out = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    header.update({k: v for k, v in (("shape", shape), ("descr", descr)) if v is not None})
    np.lib.format.write_array_header_1_0(out, header)
    out.write(array.tobytes())
    return out.getvalue()


def _rewrite(bank: Path, members: dict[str, bytes], drop: tuple[str, ...] = (),
             compression=zipfile.ZIP_STORED) -> None:
    """Replace or add members of the bank's arrays.npz (name -> npy bytes) and record the new size and hash, as a
    hostile bank would."""
    path = bank / "arrays.npz"
    with zipfile.ZipFile(path) as old:
        kept = {n: old.read(n) for n in old.namelist() if n[:-4] not in members and n[:-4] not in drop}
    with zipfile.ZipFile(path, "w", compression) as new:
        for name, data in {**kept, **{f"{k}.npy": v for k, v in members.items()}}.items():
            new.writestr(name, data)
    _edit(bank / "bank.json", lambda m: m["arrays"].update(size=path.stat().st_size, sha256=_sha256(path)))


def _array(bank: Path, key: str) -> np.ndarray:
    with np.load(bank / "arrays.npz") as data:
        return data[key]


STEP = "linear:layer_0/mlp/up:step"
IDX = "linear:layer_0/mlp/up:salient_idx"
PLANE = "linear:layer_0/mlp/up:plane0"


def test_bank_arrays_are_checked_from_their_headers_and_values(tmp_path, base):
    bank = _bank(tmp_path)
    step, idx, plane = _array(bank, STEP), _array(bank, IDX), _array(bank, PLANE)
    cases = [
        ({"extra": _npy(np.zeros(3))}, (), "does not have: 'extra.npy'"),
        ({}, (STEP,), "lacks the array"),
        ({STEP: _npy(step.astype(np.float32))}, (), "dtype float32"),
        ({PLANE: _npy(plane[:, :-1])}, (), "shape"),
        ({STEP: _npy(step, shape=(3, 1 << 40))}, (), "shape"),  # a header claiming 2^41 bytes
        ({STEP: _npy(step, shape=(1 << 20, *step.shape[1:]))}, (), "shape"),
        ({STEP: _npy(np.array([object()] * step.size, dtype=object).reshape(step.shape))}, (), "Python objects"),
        ({STEP: _npy(step)[:-10]}, (), "truncated"),
        ({STEP: _npy(step) + b"\0" * 64}, (), "more data"),
        ({STEP: _npy(np.where(np.arange(step.size).reshape(step.shape) == 5, np.nan, step).astype(np.float16))},
         (), "NaN"),
        ({IDX: _npy(np.full_like(idx, 10**6))}, (), "outside"),
        ({IDX: _npy(np.full_like(idx, -1))}, (), "outside"),
        ({IDX: _npy(idx.astype(np.int64))}, (), "dtype int64"),
    ]
    original = (bank / "arrays.npz").read_bytes(), (bank / "bank.json").read_text()
    for members, drop, match in cases:
        _rewrite(bank, members, drop)
        _refused(lambda: experts.load(bank, base), match)
        (bank / "arrays.npz").write_bytes(original[0])
        (bank / "bank.json").write_text(original[1])
    assert experts.load(bank, base).names == ("prose", "c", "tests")


# ----------------------------------------------------------------------------------------------------- routers


def _router(tmp_path, arrays: dict | None = None, raw: bytes | None = None, change=None) -> Path:
    folder = tmp_path / "router"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    shutil.copy(EXPERTS / "router.json", folder)
    if change is not None:
        _edit(folder / "router.json", change)
    if raw is not None:
        (folder / "router.npz").write_bytes(raw)
    else:
        with np.load(EXPERTS / "router.npz") as data:
            stored = {k: data[k] for k in data.files}
        np.savez(folder / "router.npz", **{**stored, **(arrays or {})})
    return folder


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_router_files_are_one_line_never_a_pickle_and_their_values_are_checked(tmp_path, base):
    with np.load(EXPERTS / "router.npz") as data:
        mean, w = data["mean"], data["w"]
    cases = [
        (dict(raw=pickle.dumps({"mean": _Payload()})), "not an npz"),
        (dict(raw=b"PK\x03\x04" + b"\0" * 20), "not an npz"),
        (dict(raw=(EXPERTS / "router.npz").read_bytes()[:300]), "damaged|not an npz"),
        (dict(arrays={"w": np.array([_Payload()] * 4, dtype=object)}), "Python objects"),
        (dict(arrays={"w": w[:, :2]}), "shape"),
        (dict(arrays={"mean": mean[:-1]}), "disagree"),
        (dict(arrays={"std": np.zeros_like(mean)}), "std must be positive"),
        (dict(arrays={"w": np.where(w == w.flat[0], np.nan, w)}), "NaN"),
        (dict(arrays={"w": w.astype(np.complex64)}), "dtype complex64"),
        (dict(arrays={"extra": np.zeros(2)}), "does not have"),
        (dict(change=lambda m: m.pop("names")), "names"),
        (dict(change=lambda m: m.update(names=["c", "c", "tests"])), "more than once"),
        (dict(change=lambda m: m.update(names=["c", 3, "tests"])), "names"),
    ]
    for kwargs, match in cases:
        folder = _router(tmp_path, **kwargs)
        _refused(lambda f=folder: Router.load(f, base), match)
    _router(tmp_path)
    (tmp_path / "router" / "router.npz").unlink()
    np.savez(tmp_path / "router" / "router.npz", **{k: v for k, v in np.load(EXPERTS / "router.npz").items()
                                                      if k != "b"})
    _refused(lambda: Router.load(tmp_path / "router", base), "lacks the array 'b'")
    assert not Path("PWNED").exists()
    assert Router.load(_router(tmp_path), base).names == ["prose", "c", "tests"]


# ------------------------------------------------------------------------------------------- checksum records


def test_checksum_records_naming_files_outside_the_checkpoint_are_damaged(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(STDLIB, ckpt)
    outside = tmp_path / "fifo"
    os.mkfifo(outside)  # hashing it would block forever: nothing outside may be opened
    record = json.loads((ckpt / "checksums.json").read_text())
    entry = {"size": 0, "sha256": "0" * 64}
    for name in ("../fifo", str(outside), "../../../../../../etc/passwd"):
        (ckpt / "checksums.json").write_text(json.dumps({**record, "files": {**record["files"], name: entry}}))
        assert any("outside the checkpoint" in p for p in verify(ckpt))
        _refused(lambda: zipjax.load(ckpt), "outside the checkpoint")
        assert "outside the checkpoint" in _one_line(capsys, ["verify", str(ckpt)])
    (ckpt / "link").symlink_to(outside)  # a recorded name inside, linking out
    (ckpt / "checksums.json").write_text(json.dumps({**record, "files": {**record["files"], "link": entry}}))
    assert verify(ckpt) == ["link is a link or not a regular file inside the checkpoint (not read)"]
    _refused(lambda: zipjax.load(ckpt), "link is a link")


# ---------------------------------------------------------------------------------------- NaN weights, arguments


def test_nan_or_infinite_weights_are_refused_by_convert_load_and_compress(tiny_models, tmp_path, base):
    import jax
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file, save_file
    from zipjax.convert import convert

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama_gqa"].hf_dir, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.inf
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(lambda: convert(src, tmp_path / "dst", progress=False), "up_proj.*NaN or infinite")

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama_gqa"].zj_dir, ckpt)
    params = jax.tree.map(np.array, jax.device_get(tiny_models["llama_gqa"].load().params))
    params["layer_0"]["attn"]["q"][0, 0, 0] = np.nan
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt / "params", params, force=True)
    checkpointer.wait_until_finished()
    write_checksums(ckpt)  # a hostile checkpoint is internally consistent
    _refused(lambda: zipjax.load(ckpt), r"\['layer_0'\]\['attn'\]\['q'\] holds NaN")

    nan_expert = jax.tree.map(np.array, jax.device_get(base.params))
    nan_expert["final_norm"]["scale"][0] = np.nan
    _refused(lambda: experts.compress(base, {"a": nan_expert}), "expert 'a'.*NaN")


@pytest.mark.parametrize("kwargs,match", [(dict(bits=True), "bits has the wrong type"),
                                          (dict(bits=2.0), "bits has the wrong type"),
                                          (dict(embed_bits=4.0), "embed_bits has the wrong type")])
def test_compress_arguments_are_integers(base, kwargs, match):
    _refused(lambda: experts.compress(base, {"a": base.params}, **kwargs), match)


def test_load_with_a_bogus_dtype_is_one_line(capsys):
    _refused(lambda: zipjax.load(STDLIB, dtype="bogus"), "dtype must be one of")


# --------------------------------------------------------------------------------------------- chat templates


def _with_template(tmp_path, template: str) -> Path:
    ckpt = tmp_path / "tpl"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STDLIB / name, ckpt)
    _edit(ckpt / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    return ckpt


def test_chat_templates_render_under_bounds_and_their_errors_are_one_line(tmp_path, monkeypatch):
    from zipjax import tokenizer

    monkeypatch.setattr(tokenizer, "CHAT_SECONDS", 3.0)
    good = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    tok = tokenizer.Tokenizer(_with_template(tmp_path, good))
    assert tok.decode(tok.chat("hi")) == "<user>hi>"
    cases = [
        # rendering output as it loops: the time bound or the memory bound, whichever a machine reaches first
        ("{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}",
         "more than 3 s|more memory"),
        ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", "more than 3 s"),
        ("{{ 'x' * 3000000000 }}", "more memory"),
        ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
         "{{ ns.s }}", "more memory"),
        ("{% for %}", "TemplateSyntaxError"),
        ("{{ nothing.here.at_all }}", "UndefinedError"),
        ("{{ raise_exception('no chat for you') }}", "no chat for you"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ ().__class__.__base__.__subclasses__() }}", "SecurityError|unsafe|UndefinedError"),
        ("{{ 'x' * 5000000 }}", "more than the 4,194,304"),
    ]
    for template, match in cases:
        tok = tokenizer.Tokenizer(_with_template(tmp_path, template))
        _refused(lambda t=tok: t.chat("hi"), match)


# --------------------------------------------------------------------------------------------------- images


def test_ask_names_a_folder_a_pipe_and_a_device_and_never_blocks(tmp_path, capsys):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    for path, named in ((tmp_path, "is a folder"), (fifo, "is a pipe"), (Path("/dev/zero"), "is a device"),
                        (tmp_path / "missing.png", "image not found")):
        assert named in _one_line(capsys, ["ask", str(path), "what digit?", "--checkpoint", str(tmp_path)])


# ------------------------------------------------------------------------------------------------------- GGUF


def _gguf(kvs: bytes, count: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, count) + kvs


def _key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


GGUF_BOMB = _gguf(_key(b"tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 1 << 62)).ljust(94, b"\0")
GGUF_NESTED = _gguf(_key(b"x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 0, 0))
GGUF_WIDE = _gguf(_key(b"general.junk") + struct.pack("<IIQ", 9, 0, 30_000_000) + b"\0" * 30_000_000)


def test_gguf_headers_declaring_more_than_the_file_holds_are_refused(tmp_path, capsys):
    assert len(GGUF_BOMB) == 94
    for name, data, match in (("bomb", GGUF_BOMB, "more than the file can hold"),
                              ("nested", GGUF_NESTED, "nests arrays"),
                              ("wide", GGUF_WIDE, "outside the tokenizer hold more than"),
                              ("keys", _gguf(b"", count=1 << 60), "metadata keys"),
                              ("short", b"GGUF\x03\0\0\0", "beyond the end")):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        assert match in _one_line(capsys, ["convert", str(path), str(tmp_path / f"out-{name}")])
        assert not (tmp_path / f"out-{name}").exists()


# ----------------------------------------------------------------------------- memory bombs, under a memory cap

ADDRESS_SPACE = 4 << 30  # a CPU jax process that loads the stdlib checkpoint reserves about 2 GiB
BOMB_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]),) * 2)
    from pathlib import Path
    import zipjax
    from zipjax import experts, tokenizer
    from zipjax.convert import convert
    tmp = Path(sys.argv[1])
    base = zipjax.load(sys.argv[2])
    tokenizer.CHAT_SECONDS = 3.0
    calls = [lambda: experts.load(tmp / "bank", base)]
    calls += [lambda p=p: convert(p, tmp / "out", progress=False) for p in sorted(tmp.glob("*.gguf"))]
    calls += [lambda t=t: tokenizer.Tokenizer(t).chat("hi") for t in sorted(tmp.glob("chat*"))]
    for call in calls:
        start = time.monotonic()
        try:
            call()
            print("ACCEPTED")
        except zipjax.ZipjaxError as e:
            print(f"{time.monotonic() - start:.1f}s", str(e).splitlines()[0])
    # this process' own peak (VmHWM belongs to the memory image; ru_maxrss would carry over the peak of the
    # forking pytest worker across exec)
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("PEAK_MB", peak_kb // 1024)
""")


def test_memory_bombs_are_refused_in_bounded_memory(tmp_path):
    """Under a 4 GiB address-space cap (a normal run needs about 2 GiB): a bank whose extra member inflates to
    1 GiB, a 94-byte GGUF declaring 2^62 elements, GGUF arrays nested 5,000 deep, and chat templates that loop or
    multiply a string to 3 GB; each refused with one line, the process' peak memory far below what they claim."""
    bank = _bank(tmp_path)
    path = bank / "arrays.npz"
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive, archive.open("bomb.npy", "w") as member:
        member.write(_npy(np.zeros(0, np.uint8), shape=(1 << 30,)))
        chunk = bytes(16 << 20)
        for _ in range(64):
            member.write(chunk)
    _edit(bank / "bank.json", lambda m: m["arrays"].update(size=path.stat().st_size, sha256=_sha256(path)))
    assert path.stat().st_size < 8 << 20
    (tmp_path / "a.gguf").write_bytes(GGUF_BOMB)
    (tmp_path / "b.gguf").write_bytes(GGUF_NESTED)
    for i, template in enumerate(("{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}"
                                  "{% endfor %}", "{{ 'x' * 3000000000 }}")):
        shutil.copytree(_with_template(tmp_path, template), tmp_path / f"chat{i}")

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(tmp_path), str(STDLIB), str(ADDRESS_SPACE)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "ACCEPTED" not in result.stdout and "Traceback" not in result.stderr, result.stdout + result.stderr[-3000:]
    assert len(lines) == 6, lines
    assert "does not have: 'bomb.npy'" in lines[0]
    assert "more than the file can hold" in lines[1] and "nests arrays" in lines[2]
    assert "more than 3 s" in lines[3] and "more memory" in lines[4]
    assert all(float(line.split()[0].removesuffix("s")) < 20 for line in lines[:5]), "\n".join(lines)
    assert int(lines[5].split()[1]) < 1500, lines[5]  # the bank member alone would be 1 GiB
    assert time.monotonic() - start < 120
