"""`jax.eval_shape` over the real LLaMA-2-7B, LLaMA-3-8B, Llama-3.1-8B and Mistral-7B configs: shape bugs at full
scale for free. The config.json files are the published ones (trimmed to the fields the converter reads), so the
whole path config.json -> ModelConfig -> parameters -> prefill + decode loop -> sharding is checked."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zipjax.convert.hf_config import config_from_hf

import zipjax
from zipjax.generate import _generate_loop, _knobs
from zipjax.kv.dense import KVCache
from zipjax.model import forward
from zipjax.sampling import SamplingMode
from zipjax.sharding import tree_shardings
from zipjax.transformer import abstract_params, param_count, param_logical_axes

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", hidden_size=4096,
              num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
REAL_CONFIGS = {
    "llama-2-7b": (dict(_LLAMA, intermediate_size=11008, num_key_value_heads=32, vocab_size=32000,
                        max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                        torch_dtype="float16"), 6_738_415_616),
    "llama-3-8b": (dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
                        eos_token_id=128001, torch_dtype="bfloat16"), 8_030_261_248),
    "llama-3.1-8b": (dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000,
                          eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16",
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192)), 8_030_261_248),
    "mistral-7b-v0.1": (dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
                             hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                             rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"), 7_241_732_096),
}


@pytest.fixture(params=list(REAL_CONFIGS))
def real(request, tmp_path):
    hf, expected_params = REAL_CONFIGS[request.param]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return request.param, config_from_hf(tmp_path), expected_params


def test_parameter_count_matches_the_published_model(real):
    name, config, expected = real
    params = abstract_params(config)
    assert param_count(params) == expected, name
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    print(f"{name}: {param_count(params):,} parameters, {nbytes / 2**30:.1f} GiB in {config.dtype}")
    assert params["layer_31"]["attn"]["k"].shape == (config.num_kv_heads, 4096, 128)


def test_prefill_and_decode_loop_shapes(real):
    _, config, _ = real
    params = abstract_params(config)
    batch, bucket, cache_len = 2, 512, 640
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, cache_len))
    prompt = jax.ShapeDtypeStruct((batch, bucket), jnp.int32)
    starts = jax.ShapeDtypeStruct((batch,), jnp.int32)
    loop = functools.partial(_generate_loop, config=config, mode=SamplingMode(greedy=False, top_k=True, top_p=True))
    tokens, out_cache = jax.eval_shape(loop, params, prompt, starts, cache, jax.random.key(0),
                                       _knobs(config, 0.7, 40, 0.9, None), jnp.int32(100))
    assert tokens.shape == (batch, cache_len) and tokens.dtype == jnp.int32
    assert jax.tree.map(lambda x: (x.shape, x.dtype), out_cache) == jax.tree.map(lambda x: (x.shape, x.dtype), cache)
    kv_bytes = sum(x.size * x.dtype.itemsize for x in out_cache.k + out_cache.v)
    assert kv_bytes == 2 * 32 * batch * config.num_kv_heads * cache_len * 128 * config.jnp_dtype.itemsize

    logits, _ = jax.eval_shape(functools.partial(forward, config=config), params, prompt,
                               jax.ShapeDtypeStruct((batch, bucket), jnp.int32), None)
    assert logits.shape == (batch, bucket, config.vocab_size) and logits.dtype == jnp.float32


def test_every_large_matrix_is_split_on_a_2x4_mesh(real):
    name, config, _ = real
    mesh = zipjax.make_mesh(data=2, model=4)
    params = abstract_params(config)
    shardings = tree_shardings(params, param_logical_axes(config), mesh)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    placed = list(zip(leaves, jax.tree.leaves(shardings), strict=True))
    for (path, x), sharding in placed:
        if x.ndim >= 2:
            assert "model" in sharding.spec, (name, jax.tree_util.keystr(path), sharding.spec)
    per_device = sum(np.prod(sharding.shard_shape(x.shape)) for (_, x), sharding in placed)
    assert per_device < param_count(params) / 3.9  # everything but the norms is split four ways
