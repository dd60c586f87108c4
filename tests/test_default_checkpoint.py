"""The shipped default checkpoint (checkpoints/stdlib-llama): it loads, matches transformers on its own weights,
reproduces the held-out perplexity its README records, and `zipjax generate` uses it when no checkpoint is given."""

import importlib.util
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from zipjax.convert.export import export_hf

import zipjax
from zipjax.checkpoint import read_config
from zipjax.cli import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped(stdlib_llama):
    return stdlib_llama  # DEFAULT_CHECKPOINT


def recorded_metrics() -> dict:
    _, manifest = read_config(DEFAULT_CHECKPOINT)
    return manifest["source"]["metrics"]


def test_it_is_small_and_documented(shipped):
    size = sum(f.stat().st_size for f in DEFAULT_CHECKPOINT.rglob("*") if f.is_file())
    assert size < 20e6
    assert 2e6 < zipjax.transformer.param_count(shipped.params) < 5e6
    readme = (DEFAULT_CHECKPOINT / "README.md").read_text()
    assert f"{recorded_metrics()['heldout_perplexity']:.2f}" in readme
    assert (ROOT / "checkpoints" / "train_stdlib_llama.py").is_file()


def test_logits_match_transformers_on_the_exported_weights(shipped, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(export_hf(DEFAULT_CHECKPOINT, tmp_path / "hf", progress=False),
                                              dtype=torch.float32).eval()
    ids = np.array([shipped.tokenizer.encode(Path(__file__).read_text())[:200]])
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    err = np.abs(np.asarray(shipped.logits(ids)) - theirs).max()
    print(f"stdlib-llama logits max abs error vs transformers {err:.2e}")
    assert err <= 1e-4


def _training_script():
    spec = importlib.util.spec_from_file_location("train_stdlib_llama", ROOT / "checkpoints" / "train_stdlib_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_perplexity_is_reproduced(shipped):
    metrics = recorded_metrics()
    if platform.python_version() != metrics["python"]:
        pytest.skip(f"the held-out files are Python {metrics['python']}'s standard library; this is "
                    f"{platform.python_version()}")
    train = _training_script()
    _, heldout_files, _ = train.stdlib_files()
    assert len(heldout_files) == metrics["heldout_files"]
    stream = np.concatenate([np.array([*shipped.tokenizer.encode(p.read_text(encoding="utf-8")), 2], np.int32)
                             for p in heldout_files])
    nll, count = train.heldout_nll(shipped.params, stream, metrics["seq"], shipped.config)
    assert count == metrics["heldout_tokens"]
    ppl = math.exp(nll / count)
    print(f"held-out perplexity {ppl:.4f} (recorded {metrics['heldout_perplexity']})")
    assert abs(ppl - metrics["heldout_perplexity"]) < 1e-3 * metrics["heldout_perplexity"]


def test_cli_generates_from_the_default_checkpoint():
    script = Path(sys.executable).parent / "zipjax"
    result = subprocess.run([str(script), "generate", "--max-new-tokens", "24", "def fibonacci(n):"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")
    assert len(result.stdout.strip()) > len("def fibonacci(n):") + 10
    assert "24 tokens: compile" in result.stderr and "tok/s" in result.stderr  # the status line, on stderr


def test_a_version_1_checkpoint_loads_heads_first_and_saves_as_version_2(shipped, tmp_path):
    """The shipped checkpoint is format version 1 ([embed, heads, head_dim] projections); loading turns them
    heads-first, on one device and straight into the shards of a mesh, and saving writes version 2."""
    import jax

    from zipjax.checkpoint import VERSION, save

    assert read_config(DEFAULT_CHECKPOINT)[1]["version"] == 1
    cfg = shipped.config
    assert shipped.params["layer_0"]["attn"]["q"].shape == (cfg.num_heads, cfg.hidden_size, cfg.head_dim)
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 24))
    logits = np.asarray(shipped.logits(ids))
    sharded = zipjax.load(DEFAULT_CHECKPOINT, mesh=zipjax.make_mesh(data=4, model=2))
    assert sharded.params["layer_0"]["attn"]["q"].sharding.spec[0] == "model"
    np.testing.assert_allclose(np.asarray(sharded.logits(ids)), logits, atol=1e-5)
    again = save(tmp_path / "v2", cfg, jax.device_get(shipped.params), files=[DEFAULT_CHECKPOINT / "tokenizer.json"])
    assert read_config(again)[1]["version"] == VERSION == 2
    np.testing.assert_array_equal(np.asarray(zipjax.load(again).logits(ids)), logits)
