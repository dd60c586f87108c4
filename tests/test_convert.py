"""`zipjax convert` for Hugging Face folders: weight and config layouts, bf16 bit-exactness, atomic writes, and a
clear error (no traceback, nothing written) for every kind of bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import COMMON, LLAMA3_ROPE, random_ids
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from zipjax.convert import convert
from zipjax.convert.hf_config import config_from_hf
from zipjax.convert.mapping import HEADS, _match

import zipjax
from zipjax.cli import main as cli_main


def tiny_hf(dtype=torch.float32, **config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, **config})).to(dtype).eval()


def save_bin(model: LlamaForCausalLM, folder: Path, shards: int = 1) -> None:
    """The legacy torch layout (transformers 5 only writes safetensors): pytorch_model.bin, or shards + index."""
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names, weight_map = sorted(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_layout(model, folder: Path, layout: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "sharded_safetensors":
        model.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").exists()
    elif layout == "bin":
        save_bin(model, folder)
    elif layout == "sharded_bin":
        save_bin(model, folder, shards=3)
    return folder


def flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "bin", "sharded_bin"])
def test_weight_layouts(tmp_path, layout):
    hf = tiny_hf()
    model = zipjax.load(convert(write_layout(hf, tmp_path / "src", layout), tmp_path / "dst", progress=False))
    ids = random_ids(1, 12)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    err = np.abs(np.asarray(model.logits(ids)) - ref).max()
    print(f"{layout}: logits max abs error {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"type": "linear", "factor": 2.0},  # the oldest spelling
    {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
])
def test_transformers4_config_layout_reads_like_transformers5(tmp_path, rope):
    """transformers 4 keeps rope_theta and rope_scaling at the top level; 5 nests them in rope_parameters."""
    theta = 500000.0
    v5 = {"rope_type": "default", "rope_theta": theta} if rope is None else {
        "rope_type": rope.get("rope_type", rope.get("type")), "rope_theta": theta,
        **{k: v for k, v in rope.items() if k not in ("type", "rope_type")}}
    hf = tiny_hf(rope_parameters=v5)
    src5 = write_layout(hf, tmp_path / "v5", "safetensors")
    src4 = write_layout(hf, tmp_path / "v4", "safetensors")
    config = json.loads((src4 / "config.json").read_text())
    assert "rope_parameters" in config
    del config["rope_parameters"]
    config.update(rope_theta=theta, rope_scaling=rope, torch_dtype=config.pop("dtype"))
    (src4 / "config.json").write_text(json.dumps(config))
    assert config_from_hf(src4) == config_from_hf(src5)
    model = zipjax.load(convert(src4, tmp_path / "dst", progress=False))
    ids = random_ids(1, 40)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.logits(ids)) - ref).max() <= 1e-4


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_bfloat16_weights_are_bit_exact(tmp_path, layout):
    hf = tiny_hf(dtype=torch.bfloat16, tie_word_embeddings=False)
    src = write_layout(hf, tmp_path / "src", layout)
    model = zipjax.load(convert(src, tmp_path / "dst", progress=False))
    assert model.config.dtype == "bfloat16"
    params = flat(model.params)
    source = {name: tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
              for name, tensor in hf.state_dict().items()}
    checked = 0
    for name, array in source.items():
        path, in_axes = _match(name)
        ours = params["".join(f"['{p}']" for p in path)]
        assert ours.dtype == ml_dtypes.bfloat16
        if in_axes == HEADS:  # [heads * head_dim, embed] -> [heads, embed, head_dim]
            expected = array.reshape(ours.shape[0], ours.shape[2], ours.shape[1]).transpose(0, 2, 1)
        else:
            expected = array if in_axes is None else array.T.reshape(ours.shape)
        np.testing.assert_array_equal(ours.view(np.uint16), expected.view(np.uint16), err_msg=name)
        checked += 1
    assert checked == len(params)


def test_tied_embeddings_and_a_stored_copy_of_lm_head(tmp_path):
    hf = tiny_hf(tie_word_embeddings=True)
    src = write_layout(hf, tmp_path / "src", "bin")  # torch's state_dict keeps lm_head.weight as well
    assert "lm_head.weight" in torch.load(src / "pytorch_model.bin", weights_only=True)
    model = zipjax.load(convert(src, tmp_path / "dst", progress=False))
    assert model.config.tie_word_embeddings and "lm_head" not in model.params
    ids = random_ids(1, 10)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.logits(ids)) - ref).max() <= 1e-4


def test_checkpoint_carries_tokenizer_and_generation_files(tmp_path):
    src = write_layout(tiny_hf(), tmp_path / "src", "safetensors")
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    dst = convert(src, tmp_path / "dst", progress=False)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "zipjax.json"} <= {
        p.name for p in dst.iterdir()}
    assert json.loads((dst / "zipjax.json").read_text())["config"]["eos_token_ids"] == [2]


# ---------------------------------------------------------------- bad input: each gives one clear error, no output


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (src / "config.json").write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _reshape_tensor(src: Path) -> None:
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    save_file(tensors, src / "model.safetensors")


def _drop_tensor(src: Path) -> None:
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors")


def _add_tensor(src: Path) -> None:
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones((16,), np.float32)
    save_file(tensors, src / "model.safetensors")


def _drop_shard(src: Path) -> None:
    (src / "model-00002-of-00005.safetensors").unlink()


BAD_SOURCES = {
    "missing folder": ("safetensors", lambda src: shutil.rmtree(src), "source not found"),
    "no config.json": ("safetensors", lambda src: (src / "config.json").unlink(), "has no config.json"),
    "malformed config.json": ("safetensors", lambda src: (src / "config.json").write_text("{'hidden_size': 64,"),
                              "is not valid JSON"),
    "config.json not an object": ("safetensors", lambda src: (src / "config.json").write_text("[1, 2]"),
                                  "must hold a JSON object"),
    "config missing a field": ("safetensors", lambda src: _edit_config(src, hidden_size=None),
                               "missing the field 'hidden_size'"),
    "config field of the wrong type": ("safetensors", lambda src: _edit_config(src, num_hidden_layers="two"),
                                       "wrong type"),
    "unsupported architecture": ("safetensors",
                                 lambda src: _edit_config(src, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                                 "GPT2LMHeadModel is not supported; zipjax converts LlamaForCausalLM, "
                                 "MistralForCausalLM"),
    "unsupported rope scaling": ("safetensors",
                                 lambda src: _edit_config(src, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                                "rope_theta": 1e4}),
                                 "RoPE scaling type 'yarn' is not supported"),
    "heads not a multiple of kv heads": ("safetensors", lambda src: _edit_config(src, num_key_value_heads=3),
                                         "multiple of num_kv_heads"),
    "no weight files": ("safetensors", lambda src: (src / "model.safetensors").unlink(), "no weights found"),
    "truncated safetensors": ("safetensors", lambda src: _truncate(src / "model.safetensors"),
                              "model.safetensors is truncated or corrupt"),
    "truncated pytorch_model.bin": ("bin", lambda src: _truncate(src / "pytorch_model.bin"),
                                    "pytorch_model.bin is truncated or corrupt"),
    "shard missing": ("sharded_safetensors", _drop_shard, "missing from .*model-00002-of-00005.safetensors"),
    "tensor of the wrong shape": ("safetensors", _reshape_tensor,
                                  r"tensor model.layers.1.self_attn.k_proj.weight has shape \(48, 64\) but the "
                                  r"config implies \(32, 64\)"),
    "tensor missing": ("safetensors", _drop_tensor, r"no tensor in the checkpoint: layer_0.mlp.up"),
    "foreign tensor": ("safetensors", _add_tensor,
                       "do not belong to a LlamaForCausalLM model: model.layers.0.self_attn.q_norm.weight"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_a_clear_error_and_writes_nothing(tmp_path, case):
    layout, damage, message = BAD_SOURCES[case]
    src = write_layout(tiny_hf(), tmp_path / "src", layout)
    damage(src)
    with pytest.raises(zipjax.ZipjaxError, match=message):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()
    assert not list(tmp_path.glob(".dst.*")), "no staging folder may be left behind"


def test_existing_destination_is_refused_unless_overwrite(tmp_path):
    src = write_layout(tiny_hf(), tmp_path / "src", "safetensors")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(zipjax.ZipjaxError, match="already exists"):
        convert(src, dst, progress=False)
    assert (dst / "precious.txt").exists()
    with pytest.raises(zipjax.ZipjaxError, match="not a zipjax checkpoint"):  # --overwrite replaces only ours
        convert(src, dst, overwrite=True, progress=False)
    assert (dst / "precious.txt").read_text() == "keep me"
    (dst / "precious.txt").unlink()
    convert(src, dst, progress=False)  # an empty folder may be filled
    convert(src, dst, overwrite=True, progress=False)  # a zipjax checkpoint may be replaced
    zipjax.load(dst)


def test_interrupted_conversion_leaves_nothing_loadable(tmp_path, monkeypatch):
    src = write_layout(tiny_hf(), tmp_path / "src", "safetensors")
    (src / "tokenizer.json").write_text("{}")
    dst = tmp_path / "dst"
    convert(src, dst, progress=False)  # an older checkpoint that an interrupted overwrite must not destroy
    before = sorted(p.name for p in dst.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the parameters were written, while copying the tokenizer

    monkeypatch.setattr("zipjax.checkpoint.shutil.copyfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, overwrite=True, progress=False)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders must be removed"
    assert sorted(p.name for p in dst.iterdir()) == before
    zipjax.load(dst)


# ---------------------------------------------------------------- loading what is not a zipjax checkpoint


def test_load_errors(tmp_path):
    src = write_layout(tiny_hf(), tmp_path / "src", "safetensors")
    with pytest.raises(zipjax.ZipjaxError, match="checkpoint not found"):
        zipjax.load(tmp_path / "nothing")
    with pytest.raises(zipjax.ZipjaxError, match=r"not a zipjax checkpoint .*convert it first"):
        zipjax.load(src)
    dst = convert(src, tmp_path / "dst", progress=False)
    (dst / "checksums.json").unlink()  # an edited manifest would fail the integrity check first (tested elsewhere)
    manifest = json.loads((dst / "zipjax.json").read_text())
    manifest["config"]["intermediate_size"] = 96
    (dst / "zipjax.json").write_text(json.dumps(manifest))
    with pytest.raises(zipjax.ZipjaxError, match=r"parameter \['layer_0'\]\['mlp'\]\['down'\] has shape \(128, 64\)"):
        zipjax.load(dst)
    (dst / "zipjax.json").write_text("{not json")
    with pytest.raises(zipjax.ZipjaxError, match="is not valid JSON"):
        zipjax.load(dst)
    (dst / "zipjax.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(zipjax.ZipjaxError, match="not a zipjax checkpoint manifest"):
        zipjax.load(dst)


def test_loading_with_another_dtype(tmp_path):
    dst = convert(write_layout(tiny_hf(), tmp_path / "src", "safetensors"), tmp_path / "dst", progress=False)
    model = zipjax.load(dst, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {np.dtype(ml_dtypes.bfloat16)}
    ref = np.asarray(zipjax.load(dst).logits(random_ids(1, 8)))
    assert np.abs(np.asarray(model.logits(random_ids(1, 8))) - ref).max() < 0.1


# ---------------------------------------------------------------- the CLI: message and status, never a traceback


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    assert capsys.readouterr().err.strip() == f"error: source not found: {tmp_path / 'missing'}"
    assert cli_main(["generate", "--checkpoint", str(tmp_path), "hello"]) == 2
    assert "is not a zipjax checkpoint" in capsys.readouterr().err


def test_cli_console_script_end_to_end(tmp_path):
    src = write_layout(tiny_hf(), tmp_path / "src", "safetensors")
    zipjax_cli = Path(sys.executable).parent / "zipjax"
    ok = subprocess.run([zipjax_cli, "convert", src, tmp_path / "dst"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "converted" in ok.stdout
    _truncate(src / "model.safetensors")
    bad = subprocess.run([zipjax_cli, "convert", src, tmp_path / "dst2"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: weight file") and "Traceback" not in bad.stderr
    assert not (tmp_path / "dst2").exists()
