"""The ZipAR harness metrics: Fréchet distance identities (against scipy's matrix square root) and the digit
classifier shipped with the digits model."""

import numpy as np
import pytest
import scipy.linalg

from zipjax.harness.digits_quality import DigitClassifier, frechet_distance


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, cov1, mu2, cov2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov1 @ cov2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * root)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu1, cov1, mu1 + 2.0, cov1) == pytest.approx(6 * 4.0, rel=1e-6)


def test_classifier_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    clf = DigitClassifier(w1=rng.normal(size=(256, 8)), b1=rng.normal(size=8), w2=rng.normal(size=(8, 10)),
                          b2=rng.normal(size=10), real_mean=np.zeros(8), real_cov=np.eye(8), heldout_accuracy=0.5)
    clf.save(tmp_path)
    again = DigitClassifier.load(tmp_path)
    images = rng.integers(0, 256, (7, 16, 16), dtype=np.uint8)
    np.testing.assert_array_equal(again.predict(images), clf.predict(images))
    assert again.heldout_accuracy == 0.5
