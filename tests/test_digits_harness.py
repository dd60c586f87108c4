"""The shipped ZipAR quality harness (checkpoints/digits-emu3): it loads as an Emu3 model with a palette vision
tokenizer, its recorded numbers are reproduced, and the digits it draws are recognisable to the shipped classifier,
sequentially and with ZipAR."""

import json
from pathlib import Path

import numpy as np
import pytest

import zipjax
from zipjax import zipar
from zipjax.emu3.vq_config import PaletteConfig
from zipjax.harness.digits_quality import DigitClassifier
from zipjax.image import Sequential

DIGITS = Path(__file__).resolve().parent.parent / "checkpoints" / "digits-emu3"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def harness(digits_emu3):
    return digits_emu3, DigitClassifier.load(DIGITS)


def test_checkpoint_is_small_and_records_its_metrics(harness):
    model, classifier = harness
    size = sum(p.stat().st_size for p in DIGITS.rglob("*") if p.is_file())
    assert size < 8 * 2**20
    assert isinstance(model.vq_config, PaletteConfig) and model.vq_config.codebook_size == 16
    metrics = json.loads((DIGITS / "zipjax.json").read_text())["source"]["metrics"]
    assert metrics["classifier_heldout_accuracy"] == round(classifier.heldout_accuracy, 4) >= 0.9
    assert str(metrics["heldout_image_nll_per_token"]) in (DIGITS / "README.md").read_text()


def test_palette_round_trip_and_real_digits(harness):
    model, classifier = harness
    heldout = np.load(DIGITS / "heldout.npz")
    images = model.to_uint8(model.decode_codes(heldout["codes"]))  # [n, 16, 16, 3] grey
    assert np.array_equal(images[..., 0], images[..., 2])
    np.testing.assert_array_equal(np.asarray(model.encode_image(images)), heldout["codes"])
    assert classifier.accuracy(images[..., 0], heldout["labels"]) == pytest.approx(classifier.heldout_accuracy)


@pytest.mark.parametrize("window", [None, 4])
def test_generated_digits_are_recognisable(harness, window):
    model, classifier = harness
    labels = np.arange(40) % 10
    result = zipjax.generate_image(model, [f"a handwritten digit {NAMES[c]}" for c in labels], size=(16, 16),
                                   cfg_scale=3.0, negative_prompt="a handwritten digit", top_k=None, seed=0,
                                   decoder=Sequential() if window is None else zipar.FixedWindow(window))
    assert result.num_forward_passes == (16 * 17 if window is None else 15 * window + 16)
    accuracy = classifier.accuracy(result.images[..., 0], labels)
    print(f"window {window}: {result.num_forward_passes} passes, accuracy {accuracy:.2f} on 40 digits")
    assert accuracy >= 0.35  # chance is 0.1; see benchmarks/zipar.py for 500-image figures


def test_digits_with_a_quantized_kv_cache(harness):
    """Image decoding composes with the quantized cache (one token per pass): 4/2-bit ZipCache still draws
    recognisable digits; ZipAR with kv= is refused. (Token identity with the dense cache is not a useful check
    here even at 8 bits: with CFG 3 this model has near-tied grey levels, and an 8-bit prompt moves its logits by
    up to 0.09, so greedy images part ways somewhere in most of them.)"""
    model, classifier = harness
    labels = np.arange(20) % 10
    prompts = [f"a handwritten digit {NAMES[c]}" for c in labels]
    common = dict(size=(16, 16), cfg_scale=3.0, negative_prompt="a handwritten digit", top_k=None, seed=0)
    result = zipjax.generate_image(model, prompts, decoder=Sequential(kv=zipjax.kv.ZipCache(buffer_len=17)), **common)
    accuracy = classifier.accuracy(result.images[..., 0], labels)
    print(f"ZipCache 4/2-bit: accuracy {accuracy:.2f} on 20 digits")
    assert accuracy >= 0.3
    # only Sequential takes kv=; the deprecated arguments, which could ask for both, refuse the mix
    with pytest.warns(DeprecationWarning), pytest.raises(zipjax.ZipjaxError, match="one token per pass"):
        zipjax.generate_image(model, prompts[:1], zipar_window=4, kv=zipjax.kv.KIVI(), **common)


def test_the_checkpoint_carries_its_own_negative_prompt(harness):
    """The digits model was trained with "a handwritten digit" as its unconditional prompt; Emu3's default negative
    prompt means nothing to it, so generate_image and `zipjax image` take the checkpoint's own by default."""
    model, _ = harness
    assert model.vision.negative_prompt == "a handwritten digit"
    args = dict(size=(16, 16), top_k=None, seed=1, decoder=zipar.FixedWindow(8))
    default = zipjax.generate_image(model, "a handwritten digit three", **args)
    explicit = zipjax.generate_image(model, "a handwritten digit three", negative_prompt="a handwritten digit", **args)
    np.testing.assert_array_equal(default.tokens, explicit.tokens)
