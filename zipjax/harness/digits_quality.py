"""Image-quality metrics of the ZipAR harness: a digit classifier's accuracy on generated digits, and the Fréchet
distance between its features of generated and of real digits (FID's recipe with a classifier trained here in
place of Inception).

The classifier is a two-layer MLP on 16x16 grey images in [0, 1], trained on real scanned digits by
`checkpoints/train_digits_emu3.py` and shipped with the digits model (`classifier.npz`, with the mean and covariance
of its features on the held-out real digits), so the metrics need neither scikit-learn nor the dataset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from zipjax.errors import ZipjaxError

CLASSIFIER_FILE = "classifier.npz"


@dataclasses.dataclass(frozen=True, eq=False)
class DigitClassifier:
    w1: np.ndarray  # [256, hidden]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [hidden, 10]
    b2: np.ndarray  # [10]
    real_mean: np.ndarray  # [hidden]: feature mean on held-out real digits
    real_cov: np.ndarray  # [hidden, hidden]
    heldout_accuracy: float

    @classmethod
    def load(cls, folder: str | Path) -> DigitClassifier:
        path = Path(folder) / CLASSIFIER_FILE
        if not path.is_file():
            raise ZipjaxError(f"{folder} has no {CLASSIFIER_FILE} (the digits model ships one)")
        with np.load(path) as f:
            return cls(**{k: f[k] for k in ("w1", "b1", "w2", "b2", "real_mean", "real_cov")},
                       heldout_accuracy=float(f["heldout_accuracy"]))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CLASSIFIER_FILE
        np.savez(path, **{k: getattr(self, k) for k in ("w1", "b1", "w2", "b2", "real_mean", "real_cov")},
                 heldout_accuracy=np.float64(self.heldout_accuracy))
        return path

    def features(self, images: np.ndarray) -> np.ndarray:
        """Grey images [n, 16, 16] (uint8, or floats in [0, 1]) -> hidden features [n, hidden]."""
        x = np.asarray(images)
        x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
        return np.maximum(x.reshape(len(x), -1) @ self.w1 + self.b1, 0.0)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.argmax(self.features(images) @ self.w2 + self.b2, axis=-1)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def frechet_distance(self, images: np.ndarray) -> float:
        """Fréchet distance between the features of `images` and those of the held-out real digits."""
        feats = self.features(images)
        return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.real_mean, self.real_cov)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), the square root through the eigenvalues of
    cov1^(1/2) cov2 cov1^(1/2) (symmetric, so real and stable)."""
    vals, vecs = np.linalg.eigh(cov1)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_sqrt = np.sum(np.sqrt(np.clip(middle, 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)
