"""Image-quality metrics of the ZipAR harness: a digit classifier's accuracy on generated digits, and the Fréchet
distance between its features of generated and of real digits (FID's recipe with a classifier trained here in
place of Inception).

The classifier is a two-layer MLP on 16x16 grey images in [0, 1], trained on real scanned digits by
`checkpoints/train_digits_emu3.py` and shipped with the digits model (`classifier.npz`, with the mean and covariance
of its features on the held-out real digits), so the metrics need neither scikit-learn nor the dataset.

Both directions of the digits model, offline: `generation_quality` (digits drawn from "a handwritten digit seven",
scored by the classifier and the Fréchet distance) and `ask_accuracy` (held-out digits shown to
`zipjax.emu3.ask` with QUESTION, the answer compared with the digit's name), each with any KV cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from zipjax.errors import ZipjaxError

CLASSIFIER_FILE = "classifier.npz"
HELDOUT_FILE = "heldout.npz"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "which digit?"
LEVELS = 16


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


def grey_rgb(codes: np.ndarray) -> np.ndarray:
    """Palette codes [..., 16, 16] in 0..15 -> the uint8 RGB grey images [..., 16, 16, 3] they stand for."""
    grey = np.round(np.asarray(codes) * 255.0 / (LEVELS - 1)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def heldout_digits(folder: str | Path, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes int32 [n, 16, 16], labels [n]) of the digits the model never trained on (the first `count`)."""
    path = Path(folder) / HELDOUT_FILE
    if not path.is_file():
        raise ZipjaxError(f"{folder} has no {HELDOUT_FILE} (the digits model ships one)")
    with np.load(path) as f:
        return f["codes"][:count], f["labels"][:count]


def ask_accuracy(model, codes: np.ndarray, labels: np.ndarray, *, kv=None, batch: int = 64) -> dict:
    """The fraction of digits (codes [n, 16, 16]) whose name `zipjax.emu3.ask` answers to QUESTION, with the KV
    cache `kv`; and the answers given. Images go `batch` at a time (every prompt has the same length, so a
    sequence's answer does not depend on its batch)."""
    from zipjax.emu3.understand import ask

    answers: list[str] = []
    for start in range(0, len(codes), batch):
        answers += ask(model, grey_rgb(codes[start:start + batch]), QUESTION, kv=kv, max_new_tokens=4)
    right = [a.strip() == NAMES[int(c)] for a, c in zip(answers, labels, strict=True)]
    return {"accuracy": float(np.mean(right)), "images": len(codes), "answers": answers}


def generation_quality(model, classifier: DigitClassifier, count: int = 200, *, seed: int = 0, batch: int = 100,
                       decoder=None) -> dict:
    """Classifier accuracy and Fréchet distance of `count` digits drawn from "a handwritten digit {name}" (labels
    0..9 in turn), with benchmarks/zipar.py's settings: classifier-free guidance 3, temperature 1, no top-k."""
    import zipjax

    labels = np.arange(count) % 10
    chosen = {} if decoder is None else {"decoder": decoder}  # None: generate_image's default (sequential)
    images = []
    for start in range(0, count, batch):
        chunk = labels[start:start + batch]
        result = zipjax.generate_image(model, [f"a handwritten digit {NAMES[c]}" for c in chunk], size=(16, 16),
                                       cfg_scale=3.0, negative_prompt="a handwritten digit", temperature=1.0,
                                       top_k=None, seed=seed + start, **chosen)
        images.append(result.images[..., 0])
    images = np.concatenate(images)
    return {"accuracy": classifier.accuracy(images, labels), "frechet": classifier.frechet_distance(images),
            "images": count}
