"""`zipjax export`: a zipjax checkpoint written back as a Hugging Face folder is the original model again (every
tensor bit-exact, bfloat16 included) and transformers loads it with the same logits."""

import json

import numpy as np
import pytest
import torch
from conftest import COMMON, LLAMA3_ROPE, random_ids
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from zipjax.convert import convert
from zipjax.convert.export import export_hf

import zipjax
from zipjax.cli import main as cli_main

MODELS = {
    "llama_bf16": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)).to(torch.bfloat16),
    "llama3_rope_tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE,
                                                             tie_word_embeddings=True)),
    "mistral_window": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, name):
    torch.manual_seed(0)
    hf = MODELS[name]().eval()
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "zj", progress=False)
    export_hf(tmp_path / "zj", tmp_path / "back", progress=False)

    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert set(exported) == set(original) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    for tensor in exported:
        assert exported[tensor].dtype == original[tensor].dtype, tensor
        np.testing.assert_array_equal(exported[tensor].view(np.uint8), original[tensor].view(np.uint8), err_msg=tensor)

    # both loaded the same way (a model cast with .to(bfloat16) would also hold its RoPE buffer in bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=hf.dtype).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=hf.dtype).eval()
    assert type(reloaded) is type(hf)
    ids = torch.from_numpy(random_ids(2, 24))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.float().numpy(), reference(ids).logits.float().numpy())
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["architectures"] == [type(hf).__name__]


def test_cli_export_and_errors(tmp_path, tiny_models, capsys):
    src = tiny_models["llama_gqa"].zj_dir
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert cli_main(["export", str(src), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    zipjax.load(src)  # the source is untouched
