"""Sharding on 8 fake CPU devices (see conftest): a 2x4 ("data", "model") mesh gives the same greedy tokens as one
device, the parameters and cache really are split, and XLA's SPMD partitioner inserts the collectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import COMMON, random_ids
from jax.sharding import Mesh, PartitionSpec
from transformers import LlamaConfig, LlamaForCausalLM
from zipjax.convert import convert

import zipjax
from zipjax.model import forward


@pytest.fixture(scope="module")
def sharded_pair(tmp_path_factory):
    """A tiny LLaMA whose heads (8), KV heads (4), MLP (128) and vocab (256) split 4 ways, and one whose 2 KV
    heads do not (they must then be replicated), each loaded on one device and on a 2x4 mesh."""
    if len(jax.devices()) < 8:
        pytest.fail("the sharding tests need 8 CPU devices: XLA_FLAGS is set in conftest.py before jax is imported")
    root = tmp_path_factory.mktemp("sharded")
    mesh = zipjax.make_mesh(data=2, model=4)
    out = {}
    for name, kv in (("divisible", 4), ("kv_replicated", 2)):
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_attention_heads": 8, "num_key_value_heads": kv}))
        hf.save_pretrained(root / name)
        dst = convert(root / name, root / f"{name}_zj", progress=False)
        out[name] = (zipjax.load(dst), zipjax.load(dst, mesh=mesh))
    return out


@pytest.mark.parametrize("name", ["divisible", "kv_replicated"])
def test_mesh_gives_the_same_greedy_tokens(sharded_pair, name, monkeypatch):
    """On "kv_replicated" the 4-way model axis does not divide the 2 KV heads: the cache is split by sequence and
    attention runs per sequence shard, the shards' softmax states combined across the axis (counted here)."""
    import zipjax.attention

    shards = []
    partial = zipjax.attention.chunked_attention_state
    monkeypatch.setattr(zipjax.attention, "chunked_attention_state",
                        lambda *args, **kw: shards.append(args[1].shape) or partial(*args, **kw))
    single, sharded = sharded_pair[name]
    ids = random_ids(4, 13, seed=7)
    prompts = [ids[0, :5].tolist(), ids[1].tolist(), ids[2, :9].tolist(), ids[3, :2].tolist()]
    tokens = zipjax.generate(sharded, prompts, 20, stop_tokens=())  # it sets the model's mesh as the context mesh
    np.testing.assert_array_equal(tokens, zipjax.generate(single, prompts, 20, stop_tokens=()))
    # traced per shard: 2 of the 4 sequences (data), both KV heads, a quarter of the slots (model); chunked_attention
    # itself (one device, and the head-split mesh through XLA) calls it on the whole cache
    per_shard = [shape for shape in shards if shape[0] == 2]
    assert per_shard == [] if name == "divisible" else per_shard and all(s[1] == 2 for s in per_shard)


def test_parameters_are_split_by_the_rules(sharded_pair):
    _, sharded = sharded_pair["divisible"]
    layer = sharded.params["layer_0"]
    assert layer["attn"]["q"].sharding.spec == PartitionSpec("model", None, None)
    assert layer["attn"]["k"].sharding.spec == PartitionSpec("model", None, None)
    assert layer["attn"]["o"].sharding.spec == PartitionSpec("model", None, None)
    assert layer["mlp"]["down"].sharding.spec == PartitionSpec("model", None)
    assert sharded.params["embed"].sharding.spec == PartitionSpec("model", None)
    assert layer["attn_norm"]["scale"].sharding.spec == PartitionSpec(None)
    assert len(layer["attn"]["q"].addressable_shards) == 8
    assert layer["attn"]["q"].addressable_shards[0].data.shape == (2, 64, 8)  # 8 heads of dim 8, 4-way split
    _, replicated_kv = sharded_pair["kv_replicated"]
    # 2 KV heads on a 4-way model axis: the k/v projections split by head_dim instead (zipjax.sharding.FALLBACKS)
    assert replicated_kv.params["layer_0"]["attn"]["k"].sharding.spec == PartitionSpec(None, None, "model")


def test_cache_is_split_over_data_and_model(sharded_pair):
    from zipjax.kv.methods import cache_initializer

    _, sharded = sharded_pair["divisible"]
    cache = cache_initializer(sharded.config, 4, 64, sharded.mesh)(jnp.zeros((4,), jnp.int32))
    assert cache.k[0].sharding.spec == PartitionSpec("data", "model", None, None)
    assert cache.k[0].addressable_shards[0].data.shape == (2, 1, 64, 8)


def test_kv_heads_the_model_axis_does_not_divide_split_the_cache_by_sequence(sharded_pair):
    """2 KV heads on a 4-way model axis: the cache is split by sequence instead of held whole on every chip (the
    dense and the quantized cache alike); the greedy tokens are those of one device (test above)."""
    from zipjax.kv.methods import cache_initializer

    _, sharded = sharded_pair["kv_replicated"]
    cache = cache_initializer(sharded.config, 4, 64, sharded.mesh)(jnp.zeros((4,), jnp.int32))
    assert cache.k[0].sharding.spec == PartitionSpec("data", None, "model", None)
    assert cache.k[0].addressable_shards[0].data.shape == (2, 2, 16, 8)  # a quarter of the sequence per chip
    quantized = cache_initializer(sharded.config, 4, 64, sharded.mesh, zipjax.kv.ZipCache(buffer_len=8), 16)(
        jnp.zeros((4,), jnp.int32))
    assert quantized.layers[0].k_buf.sharding.spec == PartitionSpec("data", None, "model", None)


def test_fallback_rules_at_pod_scale():
    """The rules as pure arithmetic: LLaMA-3-70B's 8 KV heads on a 16-way model axis split the cache by sequence
    and the k projection by head_dim; a dimension nothing divides stays whole; a mesh axis splits one dimension."""
    from zipjax.cache import KV_AXES
    from zipjax.sharding import logical_spec

    mesh = {"data": 2, "model": 16}
    assert logical_spec(KV_AXES, (32, 8, 8192, 128), mesh) == ["data", None, "model", None]
    assert logical_spec(KV_AXES, (32, 16, 8192, 128), mesh) == ["data", "model", None, None]
    assert logical_spec(KV_AXES, (32, 8, 8200, 128), mesh) == ["data", None, None, "model"]  # then head_dim
    assert logical_spec(KV_AXES, (3, 8, 8200, 120), mesh) == [None, None, None, None]
    assert logical_spec(("kv_heads", "embed", "head_dim"), (8, 8192, 128), mesh) == [None, None, "model"]
    assert logical_spec(("heads", "embed", "head_dim"), (64, 8192, 128), mesh) == ["model", None, None]


def test_spmd_partitioner_inserts_collectives(sharded_pair):
    single, sharded = sharded_pair["divisible"]
    tokens = jnp.asarray(random_ids(2, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    hlo = forward.lower(sharded.params, tokens, positions, None, config=sharded.config).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo
    np.testing.assert_allclose(np.asarray(sharded.logits(tokens)), np.asarray(single.logits(tokens)), atol=1e-5)


def test_mesh_axes_must_be_data_and_model(sharded_pair):
    single, _ = sharded_pair["divisible"]
    bad = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "tensor"))
    with pytest.raises(zipjax.ZipjaxError, match="name the axes 'data'"):
        zipjax.load(single.path, mesh=bad)
    with pytest.raises(zipjax.ZipjaxError, match="needs 6 devices, 8 given"):
        zipjax.make_mesh(data=2, model=3)


def test_quantized_cache_is_split_and_generates_on_a_mesh(sharded_pair):
    """The quantized cache's codes, scales and window are split by batch and KV head like the dense cache, and
    generation on the mesh reproduces one device (same quantization decisions)."""
    from zipjax.kv.methods import cache_initializer

    single, sharded = sharded_pair["divisible"]
    spec = zipjax.kv.ZipCache(buffer_len=8)
    cache = cache_initializer(sharded.config, 4, 64, sharded.mesh, spec, 16)(jnp.zeros((4,), jnp.int32))
    store = cache.layers[0].stores[1]
    assert store.k_codes.sharding.spec == PartitionSpec("data", "model", None, None)
    assert store.k_codes.addressable_shards[0].data.shape[:2] == (2, 1)
    assert cache.layers[0].k_buf.sharding.spec == PartitionSpec("data", "model", None, None)
    ids = random_ids(4, 13, seed=7)
    prompts = [ids[0, :5].tolist(), ids[1].tolist(), ids[2, :9].tolist(), ids[3, :2].tolist()]
    method = zipjax.kv.ZipCache(buffer_len=8)
    np.testing.assert_array_equal(zipjax.generate(sharded, prompts, 20, stop_tokens=(), kv=method),
                                  zipjax.generate(single, prompts, 20, stop_tokens=(), kv=method))


@pytest.mark.parametrize("method", [zipjax.kv.ZipVL(buffer_len=8),
                                    zipjax.kv.MiniCache(start_layer=0, inner=zipjax.kv.KIVI(bits=4, group=8))],
                         ids=["ZipVL", "MiniCache"])
def test_zipvl_and_minicache_caches_are_split_and_generate_on_a_mesh(sharded_pair, method):
    """Every per-token leaf is split by batch and (where it has one per head) KV head; bytes held equal the arrays;
    generation on the mesh reproduces one device."""
    from zipjax.kv.methods import cache_initializer

    single, sharded = sharded_pair["divisible"]
    cache = cache_initializer(sharded.config, 4, 64, sharded.mesh, method, 16)(jnp.zeros((4,), jnp.int32))
    assert cache.nbytes() == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    for leaf in jax.tree.leaves(cache):
        if leaf.ndim >= 3:  # MiniCache's whole-vector norms: one value for all heads (axis 1 of size 1)
            heads = "model" if leaf.shape[1] == sharded.config.num_kv_heads else None
            assert tuple(leaf.sharding.spec[:2]) == ("data", heads), leaf.shape
    ids = random_ids(4, 13, seed=7)
    prompts = [ids[0, :5].tolist(), ids[1].tolist(), ids[2, :9].tolist(), ids[3, :2].tolist()]
    np.testing.assert_array_equal(zipjax.generate(sharded, prompts, 20, stop_tokens=(), kv=method),
                                  zipjax.generate(single, prompts, 20, stop_tokens=(), kv=method))
