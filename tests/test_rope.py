"""RoPE against transformers: inverse frequencies (default, linear and Llama-3.1 scaling) read from real config
layouts, and the rotation itself at large positions where a non-float32 angle would already be wrong."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from zipjax.convert.hf_config import rope_from_hf

from zipjax.config import RopeConfig
from zipjax.errors import ZipjaxError
from zipjax.rope import apply_rope, inverse_frequencies, rope_tables

LLAMA31_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
CASES = {
    "llama2_default": dict(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "llama3_theta": dict(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
    "llama31_scaled": dict(head_dim=128, rope_parameters=dict(rope_theta=500000.0, **LLAMA31_SCALING)),
    "linear_x4": dict(head_dim=64, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    "small_head": dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
}


def hf_config(case: dict) -> LlamaConfig:
    head_dim = case["head_dim"]
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=131072, rope_parameters=case["rope_parameters"])


def hf_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_inverse_frequencies_match_transformers(name):
    config = hf_config(CASES[name])
    ours = inverse_frequencies(rope_from_hf(config.to_dict(), Path("config.json")), CASES[name]["head_dim"])
    theirs = hf_inverse_frequencies(config)
    assert ours.dtype == np.float32
    # bit-exact for these real configs (an arbitrary theta may differ by one ulp: torch's float32 pow is not
    # correctly rounded, ours is)
    np.testing.assert_array_equal(ours, theirs)


def test_llama3_scaling_keeps_high_and_divides_low_frequencies():
    rope = RopeConfig(theta=500000.0, type="llama3", factor=8.0, original_max_position_embeddings=8192)
    plain = inverse_frequencies(RopeConfig(theta=500000.0), 128)
    scaled = inverse_frequencies(rope, 128)
    np.testing.assert_array_equal(scaled[:10], plain[:10])  # wavelength < 8192 / 4: untouched
    np.testing.assert_allclose(scaled[-10:], plain[-10:] / 8.0, rtol=1e-6)  # wavelength > 8192: divided by factor
    assert np.all(scaled <= plain)


@pytest.mark.parametrize("name", ["llama2_default", "llama31_scaled"])
def test_rotation_matches_transformers_at_large_positions(name):
    config = hf_config(CASES[name])
    head_dim = CASES[name]["head_dim"]
    positions = np.array([[0, 1, 257, 4095, 8191, 65537, 131071]], np.int32)
    rng = np.random.RandomState(0)
    q = rng.randn(1, positions.shape[1], 2, head_dim).astype(np.float32)  # [batch, seq, heads, head_dim]

    emb = LlamaRotaryEmbedding(config)
    cos_t, sin_t = emb(torch.from_numpy(q), torch.from_numpy(positions).long())
    q_t = torch.from_numpy(q).transpose(1, 2)  # transformers: [batch, heads, seq, head_dim]
    theirs, _ = apply_rotary_pos_emb(q_t, q_t, cos_t, sin_t)

    cos, sin = rope_tables(positions, inverse_frequencies(rope_from_hf(config.to_dict(), Path("c")), head_dim))
    ours = np.asarray(apply_rope(q, cos, sin))
    err = np.abs(ours - theirs.transpose(1, 2).numpy()).max()
    print(f"{name}: rotation max abs error {err:.2e} up to position {positions.max()}")
    assert err <= 1e-5


def test_unsupported_rope_is_refused_by_name():
    with pytest.raises(ZipjaxError, match="RoPE scaling type 'yarn' is not supported"):
        rope_from_hf({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, Path("c"))
    with pytest.raises(ZipjaxError, match="needs 'low_freq_factor'"):
        rope_from_hf({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_theta": 5e5}, Path("c"))
