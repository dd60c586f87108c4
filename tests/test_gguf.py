"""`zipjax convert` of GGUF files, on a tiny LLaMA written here with the `gguf` package the way llama.cpp writes one
(Q/K rows permuted to interleaved RoPE order, mixed Q8_0/Q4_0/Q4_1/F16/F32 tensors), checked against transformers'
own GGUF loader reading the same file. The real SmolLM2 GGUF is covered by test_smollm2.py."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import COMMON, random_ids
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from zipjax.convert import convert
from zipjax.convert.gguf import unpermute_rope_rows

import zipjax

Q = gguf.GGMLQuantizationType
# tensor suffix -> storage type, so every dequantizer on the path is exercised
TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16, "ffn_gate": Q.Q8_0,
         "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0, "output": Q.F16}


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion: per head, rotate-half row order -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, tie: bool = False, arch: str = "llama") -> LlamaForCausalLM:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**COMMON, "tie_word_embeddings": tie}))
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for name, tensor in hf.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            target = f"blk.{i}.{layer_names[rest.removesuffix('.weight')]}.weight"
        else:
            target = names[name]
        array = tensor.numpy().astype(np.float32)
        if ".attn_q." in target:
            array = permute_rope_rows(array, cfg.num_attention_heads)
        elif ".attn_k." in target:
            array = permute_rope_rows(array, cfg.num_key_value_heads)
        qtype = TYPES.get(target.split(".")[-2], Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(target, array)
        elif qtype == Q.F16:
            writer.add_tensor(target, array.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.RandomState(0).randn(4 * 16, 8)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, 4), 4), w)


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_matches_transformers_gguf_loader(tmp_path, tie):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tie=tie)
    model = zipjax.load(convert(path, tmp_path / "zj", progress=False))
    assert model.config.tie_word_embeddings == tie
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ids = random_ids(2, 24)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    err = np.abs(np.asarray(model.logits(ids)) - ref).max()
    print(f"tiny GGUF (tied={tie}): logits max abs error {err:.2e}")
    assert err <= 1e-4
    prompts = [ids[0, :5].tolist(), ids[1, :11].tolist()]
    ours = zipjax.generate(model, prompts, 20, stop_tokens=())
    mask = torch.tensor([[0] * 6 + [1] * 5, [1] * 11])
    padded = torch.tensor([[0] * 6 + prompts[0], prompts[1]])
    with torch.no_grad():
        ref_tokens = ref_model.generate(padded, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours[:, 11:], ref_tokens.numpy()[:, 11:])


def test_gguf_bad_inputs(tmp_path):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(zipjax.ZipjaxError, match="GGUF architecture 'gpt2' is not supported"):
        convert(path, tmp_path / "a", progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(zipjax.ZipjaxError, match="is not a readable GGUF file"):
        convert(tmp_path / "junk.gguf", tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
