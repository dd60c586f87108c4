"""zipjax.experts (ME-Switch): packing, quantization bounds, saliency, byte accounting, every delta path on mixed
batches against each request alone on W_base + delta-hat, generate, no recompiles, a mesh, save / load, errors.

Models are tiny random LLaMAs; "experts" are the base plus random perturbations (the compression does not care how
a delta came about).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import zipjax
from zipjax import experts
from zipjax.config import ModelConfig
from zipjax.experts.bank import bytes_per_expert, sites
from zipjax.experts.compress import _activation_rms
from zipjax.experts.quantize import pack_planes, pack_planes_jnp, quantize, unpack_planes
from zipjax.generate import _generate_loop
from zipjax.kv import ZipCache
from zipjax.model import Model
from zipjax.platform import compiling_for
from zipjax.sharding import make_mesh, tree_shardings
from zipjax.transformer import Transformer, abstract_params, param_logical_axes

VOCAB = 128
MIX = ["a", None, "c", "b"]


def tiny_config(tied: bool = False) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                       tie_word_embeddings=tied, eos_token_ids=(2,))


def perturbed(params, seed: int, scale: float = 0.01):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32), params)


def random_params(config: ModelConfig, seed: int):
    """Like init_params (normal(0.02) matrices, unit norms) from numpy: no compilation."""
    rng = np.random.RandomState(seed)

    def leaf(path, a):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(a.shape, a.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


def build(tied: bool):
    config = tiny_config(tied)
    base = Model(config, random_params(config, 0))
    expert_params = {name: perturbed(base.params, seed) for seed, name in enumerate("abc", start=1)}
    calibration = None if tied else np.random.RandomState(0).randint(3, VOCAB, (4, 32))
    bank = experts.compress(base, expert_params, bits=2, salient=0.05, calibration=calibration)
    return base, bank


@pytest.fixture(scope="module")
def untied():
    return build(tied=False)


@pytest.fixture(scope="module")
def tied():
    return build(tied=True)


def prompts(batch: int = 4) -> list[list[int]]:
    rng = np.random.RandomState(1)
    return [list(rng.randint(3, VOCAB, n)) for n in (5, 9, 3, 7)[:batch]]


# ---------------------------------------------------------------- packing and quantization


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_planes_round_trip_in_the_kernel_layout(bits):
    widths = experts.quantize.plane_widths(bits)
    codes = np.random.RandomState(bits).randint(0, 1 << bits, (3, 32, 5)).astype(np.uint8)
    planes = pack_planes(codes, widths)
    for plane, reference, w in zip(planes, pack_planes_jnp(jnp.asarray(codes), widths), widths, strict=True):
        assert plane.shape == (3, 32 * w // 8, 5) and plane.dtype == np.uint8
        np.testing.assert_array_equal(plane, np.asarray(reference))
    np.testing.assert_array_equal(np.asarray(unpack_planes(planes, widths)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_bound_on_rows_and_exact_salient_rows(bits):
    delta = np.random.RandomState(0).standard_normal((64, 24)).astype(np.float32) * 0.01
    q = quantize(delta, bits, 4, act_rms=np.ones(64))
    deq = q.dequantize()
    step, lo = q.step.astype(np.float32), q.minimum.astype(np.float32)
    hi = lo + step * ((1 << bits) - 1)
    rest = np.setdiff1d(np.arange(64), q.salient_idx)
    inside = (delta[rest] >= lo) & (delta[rest] <= hi)
    err = np.abs(delta[rest] - deq[rest])
    assert inside.mean() > 0.8
    assert np.all(err[inside] <= (step / 2 * (1 + 1e-5) + 1e-9)[None].repeat(len(rest), 0)[inside])
    # salient rows: codes + float16 residual reproduce the delta to float16 rounding of the residual
    residual = q.salient_rows.astype(np.float32)
    np.testing.assert_allclose(deq[q.salient_idx], delta[q.salient_idx], rtol=0,
                               atol=float(np.abs(residual).max()) * 2**-10 + 1e-12)


def test_one_bit_is_sign_times_column_mean():
    delta = np.random.RandomState(0).standard_normal((32, 8)).astype(np.float32)
    q = quantize(delta, 1, 0)
    scale = np.abs(delta).mean(0).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(q.dequantize(), np.where(delta > 0, scale, -scale))


def test_planted_outlier_channels_are_chosen_and_lower_the_output_error():
    rng = np.random.RandomState(0)
    delta = rng.standard_normal((128, 64)).astype(np.float32) * 0.01
    x = rng.standard_normal((256, 128)).astype(np.float32)
    planted = np.array([7, 40, 99])
    x[:, planted] *= 50.0
    rms = np.sqrt((x**2).mean(0))
    error = lambda q: np.linalg.norm(x @ (delta - q.dequantize())) / np.linalg.norm(x @ delta)
    chosen = quantize(delta, 2, 4, act_rms=rms, score="error")
    assert set(planted) <= set(chosen.salient_idx.tolist())
    plain = error(quantize(delta, 2, 0))
    assert error(chosen) < 0.5 * plain
    assert error(quantize(delta, 2, 4, score="magnitude")) > 0.8 * plain  # magnitude alone does not find them


def test_byte_accounting_is_exact(untied, tied):
    for base, bank in (untied, tied):
        sizes = bank.nbytes()
        assert sizes["total"] == sum(x.nbytes for x in jax.tree.leaves(bank))
        per_expert = bytes_per_expert(base.config, bits=2, salient=0.05)
        assert {k: sizes[k] // bank.num_experts for k in per_expert} == per_expert
        assert sizes["per_expert"] == per_expert["total"]
    # 2 bits per entry of every matrix, by hand, for the untied model (no salient channels, 4-bit vocabularies)
    cfg = tiny_config()
    matrices = cfg.num_layers * (cfg.hidden_size * (2 * 64 + 2 * 32) + 3 * cfg.hidden_size * cfg.intermediate_size)
    assert bytes_per_expert(cfg, 2, 0.0)["codes"] == matrices * 2 // 8
    assert bytes_per_expert(cfg, 2, 0.0)["embedding"] == 2 * (cfg.hidden_size * VOCAB // 2 + 4 * VOCAB)


def test_calibration_statistics_come_from_an_interceptor_not_the_model(untied):
    """compress reads each projection's input through a flax method interceptor (the transformer records nothing
    itself): one entry per projection site, and the q / k / v input is the first attention norm's output."""
    base, _ = untied
    cfg = base.config
    tokens = np.random.RandomState(0).randint(3, VOCAB, (2, 16))
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape)
    _, state = Transformer(cfg).apply({"params": base.params}, tokens, positions, mutable=["intermediates"])
    assert not state.get("intermediates"), "the model itself sows nothing"
    rms = _activation_rms(base.params, cfg, list(tokens), "error")
    assert set(rms) == set(sites(cfg)) - {"embed"}  # untied: the embedding is a lookup, lm_head a projection
    x = np.asarray(base.params["embed"], np.float32)[tokens]  # [2, 16, embed]
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps)
    normed = normed * np.asarray(base.params["layer_0"]["attn_norm"]["scale"], np.float32)
    np.testing.assert_allclose(rms["layer_0/attn/q"], np.sqrt((normed * normed).mean(axis=(0, 1))), rtol=1e-5)
    np.testing.assert_array_equal(rms["layer_0/attn/k"], rms["layer_0/attn/q"])
    assert rms["layer_0/attn/o"].shape == (cfg.num_heads * cfg.head_dim,)
    assert rms["layer_0/mlp/down"].shape == (cfg.intermediate_size,)


# ---------------------------------------------------------------- serving


def solo_logits(merged, ids: list[int], expert, length: int) -> np.ndarray:
    """One request alone on W_base + delta-hat of its expert (a model of attach(..., merged=True): the plain model on
    the merged weights; no cache, right-padded: causal, so exact)."""
    padded = np.asarray(ids + [0] * (length - len(ids)))[None]
    return np.asarray(merged.logits(padded, expert=expert))[0]


@pytest.mark.parametrize("mode", [{"kernel": False, "path": "dense"}, {"kernel": False, "path": "grouped"},
                                  {"kernel": True}], ids=["dense", "grouped", "kernel"])
def test_mixed_batch_through_the_cache_equals_each_request_alone(mode, untied):
    """Left-padded prompts of base-only and expert rows fed slot by slot through the KV cache (one compiled step:
    the multi-token prefill is the generate tests' part), every logit against each request alone on W_b + delta-hat.
    The untied model: its LM head is a linear site of its own; the generate tests use a tied one."""
    base, bank = untied
    model = experts.attach(base, bank, **mode)
    merged = experts.attach(base, bank, merged=True)
    steps, batch = 3, prompts()
    rng = np.random.RandomState(2)
    full = [p + list(rng.randint(3, VOCAB, steps)) for p in batch]
    width = max(map(len, batch))
    starts = np.asarray([width - len(p) for p in batch], np.int32)
    tokens = np.asarray([[0] * (width - len(p)) + f for p, f in zip(batch, full, strict=True)])
    positions = np.maximum(np.arange(tokens.shape[1])[None] - starts[:, None], 0).astype(np.int32)
    cache = zipjax.KVCache.init(base.config, len(batch), 32, starts=jnp.asarray(starts))
    got = []
    for t in range(width + steps - 1):
        logits, cache = model.apply(tokens[:, t:t + 1], positions[:, t:t + 1], cache, expert=MIX)
        got.append(np.asarray(logits[:, 0]))
    got = np.stack(got[width - 1:], 1)  # [batch, steps, vocab]: from each prompt's last token on
    length = max(map(len, full))
    for i, (p, f, e) in enumerate(zip(batch, full, MIX, strict=True)):
        want = solo_logits(merged, f, e, length)[len(p) - 1: len(p) - 1 + steps]
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=0)


def solo_generate(merged, prompt: list[int], expert, n: int, **kwargs) -> np.ndarray:
    """One request alone on W_base + delta-hat (a model of attach(..., merged=True): the plain model on merged
    weights)."""
    return zipjax.generate(merged, [prompt], n, expert=expert, stop_tokens=(), **kwargs)[0]


def test_generate_matches_solo_runs_and_a_new_mix_does_not_recompile(tied):
    """Tied embeddings (as stdlib-llama): the embedding site is also the output head."""
    base, bank = tied
    model = experts.attach(base, bank)
    merged = experts.attach(base, bank, merged=True)
    batch = prompts()
    out = zipjax.generate(model, batch, 6, expert=MIX, stop_tokens=())
    for i, (p, e) in enumerate(zip(batch, MIX, strict=True)):
        np.testing.assert_array_equal(out[i, -6:], solo_generate(merged, p, e, 6)[-6:])
    compiled = _generate_loop._cache_size()
    again = zipjax.generate(model, batch, 6, expert=["c", "c", None, "a"], stop_tokens=())
    assert _generate_loop._cache_size() == compiled
    np.testing.assert_array_equal(again[2, -6:], solo_generate(merged, batch[2], None, 6)[-6:])
    with pytest.raises(zipjax.ZipjaxError, match="one expert"):
        zipjax.generate(merged, batch, 4, expert=MIX)


def test_zipcache_mixed_batch_equals_each_request_alone(tied):
    """With kv=ZipCache(): each row of a mixed batch against a batch of that request alone (repeated, the same
    compiled program: a ZipCache program costs ~12 s to compile here; that the delta path equals W_b + delta-hat
    is the dense-cache tests' part)."""
    base, bank = tied
    model = experts.attach(base, bank)
    batch = prompts()
    out = zipjax.generate(model, batch, 4, expert=MIX, kv=ZipCache(), stop_tokens=())
    for i, (p, e) in enumerate(zip(batch, MIX, strict=True)):
        alone = zipjax.generate(model, [p] * len(batch), 4, expert=[e] * len(batch), kv=ZipCache(), stop_tokens=())
        np.testing.assert_array_equal(out[i, -4:], alone[0, -4:])


def test_mesh_2x4_equals_one_device(tied):
    base, bank = tied
    mesh = make_mesh(data=2, model=4)
    shardings = tree_shardings(base.params, param_logical_axes(base.config), mesh)
    on_mesh = Model(base.config, jax.device_put(base.params, shardings), mesh=mesh)
    model = experts.attach(on_mesh, bank)
    plane = model.deltas.bank.linears["layer_0/mlp/up"].planes[0]
    assert plane.sharding.spec == PartitionSpec(None, None, "model")
    assert model.deltas.bank.linears["embed"].step.sharding.spec == PartitionSpec(None, "model")
    with compiling_for("gpu"):  # kernel=None: the Pallas kernel is not shard-mapped, so the jnp path on a mesh
        assert model.batch_inputs(MIX, len(MIX))[1].mode == "dense"
    with pytest.raises(zipjax.ZipjaxError, match="mesh"):
        experts.attach(on_mesh, bank, kernel=True)
    one = experts.attach(base, bank)
    out = zipjax.generate(model, prompts(), 6, expert=MIX, stop_tokens=())
    np.testing.assert_array_equal(out, zipjax.generate(one, prompts(), 6, expert=MIX, stop_tokens=()))


def test_the_kernel_policy_resolves_at_trace_time_and_delta_mode_still_maps(untied):
    """kernel=None follows zipjax.platform.use_kernel where it is traced: the jnp path on a CPU, the Pallas kernel
    tracing for a GPU (this model's sites tile there; on a TPU, in / 4 = 16 channels do not); explicit kernel= wins.
    The old delta_mode= names map onto kernel= / path= / merged= with a DeprecationWarning."""
    base, bank = untied
    mode = lambda model: model.batch_inputs(MIX, len(MIX))[1].mode
    auto = experts.attach(base, bank)
    grouped = experts.attach(base, bank, kernel=False, path="grouped")
    assert mode(auto) == "dense" and mode(grouped) == "grouped"
    assert mode(experts.attach(base, bank, kernel=True)) == "kernel"
    with compiling_for("gpu"):
        assert mode(auto) == "kernel" and mode(grouped) == "grouped"
    with compiling_for("tpu"):
        assert mode(auto) == "dense"
    for name, keywords in experts.DELTA_MODES.items():
        with pytest.warns(DeprecationWarning, match=f"delta_mode={name!r}"):
            old = experts.attach(base, bank, delta_mode=name)
        if name == "merged":
            assert isinstance(old.deltas, experts.MergedExperts)
        else:
            assert (old.deltas.kernel, old.deltas.path) == (keywords["kernel"], keywords.get("path", "dense"))
    with pytest.raises(zipjax.ZipjaxError, match="path"):
        experts.attach(base, bank, path="fast")
    with pytest.raises(zipjax.ZipjaxError, match="kernel"):
        experts.attach(base, bank, kernel="yes")
    with pytest.raises(zipjax.ZipjaxError, match="merged"):
        experts.attach(base, bank, merged=True, kernel=True)
    with pytest.raises(zipjax.ZipjaxError, match="one or the other"):
        experts.attach(base, bank, delta_mode="dense", path="grouped")
    with pytest.raises(zipjax.ZipjaxError, match="already serves experts"):
        experts.attach(auto, bank)


def test_auto_without_a_router_is_a_clear_error(tied):
    base, bank = tied
    with pytest.raises(zipjax.ZipjaxError, match="router"):
        zipjax.generate(experts.attach(base, bank), prompts(2), 2, expert="auto")


# ---------------------------------------------------------------- save / load and errors


def test_save_load_is_bit_exact_and_checks_the_base(untied, tmp_path):
    base, bank = untied
    path = bank.save(tmp_path / "bank")
    loaded = experts.load(path, base)
    assert loaded.names == bank.names and loaded.bits == bank.bits and loaded.settings == bank.settings
    for a, b in zip(jax.tree.leaves(bank), jax.tree.leaves(loaded), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = Model(base.config, perturbed(base.params, 9, 1e-3))
    with pytest.raises(zipjax.ZipjaxError, match="other base weights"):
        experts.load(path, other)
    with pytest.raises(zipjax.ZipjaxError, match="other base weights"):
        experts.attach(other, bank)
    with pytest.raises(zipjax.ZipjaxError, match="not found"):
        experts.load(tmp_path / "missing", base)
    with pytest.raises(zipjax.ZipjaxError, match=r"already exists|overwrite"):
        bank.save(path)
    manifest = json.loads((path / "bank.json").read_text())
    (path / "bank.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(zipjax.ZipjaxError, match="version 99"):
        experts.load(path, base)
    (path / "bank.json").write_text(json.dumps(manifest))
    with open(path / "arrays.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff")
    with pytest.raises(zipjax.ZipjaxError, match="damaged"):
        experts.load(path, base)


def test_bad_inputs_are_clear_errors(untied):
    base, bank = untied
    params = {"a": perturbed(base.params, 1)}
    with pytest.raises(zipjax.ZipjaxError, match="bits"):
        experts.compress(base, params, bits=5)
    with pytest.raises(zipjax.ZipjaxError, match="salient"):
        experts.compress(base, params, salient=0.9)
    with pytest.raises(zipjax.ZipjaxError, match="non-empty"):
        experts.compress(base, {})
    other = tiny_config().replace(intermediate_size=96)
    other_params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(other))
    with pytest.raises(zipjax.ZipjaxError, match="architecture"):
        experts.compress(base, {"a": Model(other, other_params)})
    with pytest.raises(zipjax.ZipjaxError, match="shapes"):
        experts.compress(base, {"a": other_params})
    model = experts.attach(base, bank)
    with pytest.raises(zipjax.ZipjaxError, match="no expert named"):
        zipjax.generate(model, prompts(2), 2, expert=["a", "zzz"])
    with pytest.raises(zipjax.ZipjaxError, match="one per prompt"):
        zipjax.generate(model, prompts(2), 2, expert=["a"])
    with pytest.raises(zipjax.ZipjaxError, match="delta_mode"):
        experts.attach(base, bank, delta_mode="fast")
    with pytest.raises(zipjax.ZipjaxError, match="attach"):
        zipjax.generate(base, prompts(2), 2, expert="a")


def test_cli_compresses_checkpoints_into_a_bank(tied, tmp_path):
    from zipjax.checkpoint import save
    from zipjax.cli import main

    base, bank = tied
    save(tmp_path / "base", base.config, base.params)
    for seed, name in enumerate("ab", start=1):
        save(tmp_path / name, base.config, perturbed(base.params, seed))
    args = ["experts", "compress", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "b"),
            "--out", str(tmp_path / "bank"), "--bits", "2", "--salient", "0.05"]
    assert main(args) == 0
    loaded = experts.load(tmp_path / "bank", zipjax.load(tmp_path / "base"))
    assert loaded.names == ("a", "b")
    np.testing.assert_array_equal(np.asarray(loaded.linears["layer_0/mlp/up"].planes[0]),
                                  np.asarray(bank.linears["layer_0/mlp/up"].planes[0][:2]))
    assert main([*args[:-4], "--bits", "5"]) == 2  # a ZipjaxError, one line
    assert main(["generate", "x", "--expert", "a"]) == 2
