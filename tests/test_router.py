"""The expert="auto" router (zipjax.experts.router) on the shipped fixture checkpoints/stdlib-experts.

The fixture ships the router trained by checkpoints/train_experts.py on training windows of the three domains; here
it classifies the shipped held-out windows (documents never trained on) by their first 64 tokens, and its accuracy
must beat chance (1/3) by a wide margin. The head is also fitted here (zipjax.harness.router_training) on
synthetic features (fast, no model), and save/load, the base check and expert="auto" through attach/generate are
exercised.
"""

from pathlib import Path

import numpy as np
import pytest

import zipjax
from zipjax.experts import router as routing
from zipjax.harness import router_training

FIXTURE = Path(__file__).parent.parent / "checkpoints" / "stdlib-experts"
PREFIX = 64
MIN_ACCURACY = 1 / 3 + 0.3  # chance is 1/3 for three domains


@pytest.fixture(scope="module")
def base(stdlib_llama):
    return stdlib_llama


@pytest.fixture(scope="module")
def heldout():
    with np.load(FIXTURE / "heldout.npz") as data:
        return {k: data[k] for k in data.files}


def test_router_beats_chance_on_heldout_windows(base, heldout):
    router = routing.Router.load(FIXTURE, base)
    assert router.names == ["prose", "c", "tests"]
    prompts = np.concatenate([heldout[n][:, :PREFIX] for n in router.names])
    labels = np.concatenate([np.full(len(heldout[n]), i) for i, n in enumerate(router.names)])
    predicted = router.predict(base, prompts)
    accuracy = float((predicted == labels).mean())
    per_domain = {n: float((predicted[labels == i] == i).mean()) for i, n in enumerate(router.names)}
    print(f"router accuracy on {len(labels)} held-out {PREFIX}-token prompts: {accuracy:.3f} {per_domain}")
    assert accuracy >= MIN_ACCURACY


def test_fit_separates_synthetic_classes():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 3
    labels = rng.integers(0, 3, 300)
    features = centers[labels] + rng.normal(size=(300, 16))
    router = router_training.fit(features, labels, ["a", "b", "c"], "f" * 64, steps=200)
    assert (router.predict_features(features) == labels).mean() > 0.95


def test_save_load_round_trip_and_base_check(tmp_path, base):
    router = routing.Router.load(FIXTURE, base)
    router.save(tmp_path)
    again = routing.Router.load(tmp_path, base)
    for name in ("mean", "std", "w", "b"):
        np.testing.assert_array_equal(getattr(again, name), getattr(router, name))
    assert again.names == router.names and again.base_fingerprint == router.base_fingerprint

    other = zipjax.Model(config=base.config, params={**base.params, "embed": base.params["embed"] * 1.001},
                         path=base.path)
    with pytest.raises(zipjax.ZipjaxError, match="fingerprint"):
        routing.Router.load(FIXTURE, other)
    (tmp_path / "router.json").write_text("{not json")
    with pytest.raises(zipjax.ZipjaxError, match="not valid JSON"):
        routing.Router.load(tmp_path)


def test_route_pads_prompts_of_different_lengths(base, heldout):
    """Right padding must not change a prompt's features: each prompt alone equals it in a ragged batch."""
    prompts = [heldout["c"][0, :40].tolist(), heldout["prose"][0, :PREFIX].tolist(), heldout["tests"][0, :7].tolist()]
    together = routing.pooled_features(base, prompts)
    alone = np.concatenate([routing.pooled_features(base, [p]) for p in prompts])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
