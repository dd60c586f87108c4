"""`zipjax convert` for Emu3: the transformers-native folder (single file, shards, bf16) and BAAI's original layout
(language-model folder with a tiktoken vocabulary + a separate vision-tokenizer folder), and the errors for
inputs that cannot make an Emu3 checkpoint.

BAAI's layout is built here from the transformers-native tiny model by renaming every tensor the way BAAI's module
tree names it (the same numbers; attention projections as 1x1 convolutions), writing its configs, and re-numbering
the vocabulary the way BAAI's tokenizer numbers it. Converting both must give the same model: same VQ-VAE
parameters, and the same image, token for token, from the same text prompt.
"""

import base64
import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from random_hf import save_random_emu3
from safetensors.numpy import load_file, save_file
from zipjax.convert import convert
from zipjax.convert.emu3_vq import BAAI, HF, vq_tensor_plan
from zipjax.convert.tiktoken_bpe import _byte_symbols

import zipjax
from zipjax.cli import main as cli_main
from zipjax.emu3.vq_config import VQConfig
from zipjax.image import generate_image

TINY_VQ = VQConfig(codebook_size=64, base_channels=32, channel_multiplier=(1, 2), num_res_blocks=1,
                   attn_resolutions=(1,))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3conv")
    hf_dir = save_random_emu3(root / "hf")
    return hf_dir, convert(hf_dir, root / "zj", progress=False)


def _params_equal(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def test_sharded_safetensors_convert_identically(native, tmp_path):
    _, zj_dir = native
    sharded = save_random_emu3(tmp_path / "sharded", max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = zipjax.load(zj_dir), zipjax.load(convert(sharded, tmp_path / "zj", progress=False))
    assert _params_equal(a.params, b.params) and _params_equal(a.vq_params, b.vq_params)


def test_bfloat16_is_bit_exact(tmp_path):
    folder = save_random_emu3(tmp_path / "bf16", dtype=torch.bfloat16)
    model = zipjax.load(convert(folder, tmp_path / "zj", progress=False))
    assert model.config.dtype == model.vq_config.dtype == "bfloat16"
    raw = load_file(folder / "model.safetensors")
    embed = raw["text_model.model.embed_tokens.weight"]
    codebook = raw["vqmodel.quantize.embedding.weight"]
    conv = raw["vqmodel.decoder.conv_in.weight"]  # [out, in, 3, 3] -> [3, 3, in, out]
    assert embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(model.params["embed"]).view(np.uint16), embed.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(model.vq_params["codebook"]).view(np.uint16), codebook.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(model.vq_params["decoder"]["conv_in"]["kernel"]).view(np.uint16),
                                  conv.transpose(2, 3, 1, 0).view(np.uint16))
    codes = np.zeros((1, 2, 2), np.int32)
    assert np.isfinite(np.asarray(model.decode_codes(codes), np.float32)).all()


# ---------------------------------------------------------------- BAAI's layout


def _baai_layout(hf_dir: Path, root: Path) -> tuple[Path, Path, dict[int, int]]:
    """BAAI's two folders holding the native tiny model's numbers; returns them and the old id -> new id map."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    regular = {k: v for k, v in tok["model"]["vocab"].items() if k not in specials}
    first_special = len(regular)
    assert sorted(regular.values()) == list(range(first_special))
    unspell = {s: b for b, s in enumerate(_byte_symbols())}
    visual = sorted(k for k in specials if k.startswith("<|visual token"))
    baai_names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)),
                  "<|image token|>", "<|image start|>", "<|image end|>", *visual]
    new_id = {**{v: v for v in regular.values()},
              **{specials[n]: first_special + i for i, n in enumerate(baai_names) if n in specials}}

    lm_dir, vq_dir = root / "Emu3-Gen", root / "Emu3-VisionTokenizer"
    lm_dir.mkdir()
    vq_dir.mkdir()
    with (lm_dir / "emu3.tiktoken").open("w") as f:
        for text, rank in sorted(regular.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(bytes(unspell[c] for c in text)).decode()} {rank}\n")
    (lm_dir / "emu3_vision_tokens.txt").write_text("\n".join(baai_names[208:]) + "\n")
    (lm_dir / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_emu3.Emu3Tokenizer", None]}}))

    hf_config = json.loads((hf_dir / "config.json").read_text())
    text = hf_config["text_config"]
    vocab_size = first_special + len(baai_names)
    ids = {name: first_special + baai_names.index(name) for name in ("<|extra_203|>", "<|extra_204|>",
                                                                     "<|endoftext|>")}
    lm_config = {
        "architectures": ["Emu3ForCausalLM"], "model_type": "Emu3",
        "auto_map": {"AutoConfig": "configuration_emu3.Emu3Config",
                     "AutoModelForCausalLM": "modeling_emu3.Emu3ForCausalLM"},
        "vocab_size": vocab_size, "rope_theta": 1000000.0,
        "bos_token_id": ids["<|extra_203|>"], "eos_token_id": ids["<|extra_204|>"],
        "pad_token_id": ids["<|endoftext|>"],
        **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")},
    }
    (lm_dir / "config.json").write_text(json.dumps(lm_config))

    weights = load_file(hf_dir / "model.safetensors")
    rng = np.random.default_rng(0)
    lm = {}
    for name, array in weights.items():
        if name.startswith("text_model."):
            name = name.removeprefix("text_model.")
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                renumbered = rng.normal(0, 0.02, (vocab_size, array.shape[1])).astype(array.dtype)
                for old, new in new_id.items():
                    renumbered[new] = array[old]
                array = renumbered
            lm[name] = array
    save_file(lm, str(lm_dir / "model.safetensors"))

    vq = hf_config["vq_config"]
    (vq_dir / "config.json").write_text(json.dumps({
        "architectures": ["Emu3VisionVQModel"], "model_type": "Emu3VisionVQ", "ch": vq["base_channels"],
        "ch_mult": vq["channel_multiplier"], "z_channels": vq["latent_channels"], "double_z": False,
        "embed_dim": vq["embed_dim"], "codebook_size": vq["codebook_size"], "num_res_blocks": vq["num_res_blocks"],
        "attn_resolutions": vq["attn_resolutions"], "temporal_downsample_factor": 4, "in_channels": 3,
        "out_channels": 3, "dropout": 0.0}))
    shutil.copy(hf_dir / "preprocessor_config.json", vq_dir)
    baai_name = {path: name for name, path, _ in vq_tensor_plan(TINY_VQ, BAAI)}
    vision = {}
    for hf_name, path, kind in vq_tensor_plan(TINY_VQ, HF):
        array = weights[f"vqmodel.{hf_name}"]
        vision[baai_name[path]] = array.reshape(*array.shape, 1, 1) if kind == "dense" else array
    for name, array in weights.items():
        if name.endswith("num_batches_tracked"):
            vision[name.removeprefix("vqmodel.")] = array
    save_file(vision, str(vq_dir / "model.safetensors"))
    return lm_dir, vq_dir, new_id


@pytest.fixture(scope="module")
def baai(native, tmp_path_factory):
    hf_dir, _ = native
    root = tmp_path_factory.mktemp("baai")
    lm_dir, vq_dir, new_id = _baai_layout(hf_dir, root)
    zj = convert(lm_dir, root / "zj", vision_tokenizer=vq_dir, progress=False)
    return lm_dir, vq_dir, zj, new_id


def test_baai_layout_gives_the_same_model(native, baai):
    _, zj_native = native
    _, _, zj_baai, new_id = baai
    a, b = zipjax.load(zj_native), zipjax.load(zj_baai)
    assert _params_equal(a.vq_params, b.vq_params)
    assert b.vocab.visual_offset == new_id[a.vocab.visual_offset] and b.vocab.eol == new_id[a.vocab.eol]
    text = "a watercolor painting of mountains at sunset, 0123 masterpiece."
    ours = a.tokenizer.encode(text, add_special_tokens=False)
    assert b.tokenizer.encode(text, add_special_tokens=False) == [new_id[t] for t in ours]
    image_a = generate_image(a, text, size=(8, 10), cfg_scale=2.0, negative_prompt="blurry", temperature=0)
    image_b = generate_image(b, text, size=(8, 10), cfg_scale=2.0, negative_prompt="blurry", temperature=0)
    assert image_b.prompt_ids[0] == [new_id[t] for t in image_a.prompt_ids[0]]
    np.testing.assert_array_equal(image_a.codes, image_b.codes)
    np.testing.assert_array_equal(image_a.images, image_b.images)


def test_baai_language_model_needs_its_vision_tokenizer(baai, tmp_path, capsys):
    lm_dir = baai[0]
    with pytest.raises(zipjax.ZipjaxError, match="pass --vision-tokenizer"):
        convert(lm_dir, tmp_path / "a", progress=False)
    assert cli_main(["convert", str(lm_dir), str(tmp_path / "b"), "--vision-tokenizer", str(lm_dir)]) == 2
    assert "does not describe an Emu3 vision tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_emu3_bad_inputs(native, tmp_path):
    hf_dir, _ = native

    def variant(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(hf_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    no_boi = variant("no_boi", lambda c: c["vocabulary_map"].pop("<|image start|>"))
    with pytest.raises(zipjax.ZipjaxError, match=r"lacks Emu3's special tokens <\|image start\|>"):
        convert(no_boi, tmp_path / "x", progress=False)
    few_visual = variant("few", lambda c: c["vocabulary_map"].pop("<|visual token 000063|>"))
    with pytest.raises(zipjax.ZipjaxError, match="63 visual tokens, but the VQ-VAE codebook has 64"):
        convert(few_visual, tmp_path / "x", progress=False)
    wide = variant("wide", lambda c: c["vq_config"].update(base_channels=64, hidden_size=128))
    with pytest.raises(zipjax.ZipjaxError, match=r"vision tokenizer tensor .* has shape"):
        convert(wide, tmp_path / "x", progress=False)
    text_only = variant("text_only", lambda c: c.pop("vq_config"))
    with pytest.raises(zipjax.ZipjaxError, match="cannot make images"):
        convert(text_only, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_vision_tokenizer_flag_is_refused_for_llama(tiny_models, tmp_path):
    with pytest.raises(zipjax.ZipjaxError, match="applies to Emu3 models only"):
        convert(tiny_models["llama_gqa"].hf_dir, tmp_path / "x", vision_tokenizer=tmp_path / "vq", progress=False)


def test_export_refuses_emu3(native, tmp_path):
    from zipjax.convert.export import export_hf

    with pytest.raises(zipjax.ZipjaxError, match="exporting emu3 checkpoints is not supported"):
        export_hf(native[1], tmp_path / "x", progress=False)
