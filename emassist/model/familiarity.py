"""Is this image like the training data? A feature-space score with a threshold set on val.

The score is the Mahalanobis distance (Lee et al., 2018) of an image's penultimate features (the input of the
model's classifier layer: global-pooled for the CNNs and Xception) to the nearest class mean, under one covariance
shared by the classes (Ledoit–Wolf shrinkage, so that a few hundred images per class are enough for 2048 features).
Means and covariance are fitted on the train split; the threshold is the ``evaluate.unfamiliar_quantile`` quantile of
the val split's distances, so that share of familiar images passes. The pyfunc reports ``unfamiliar_score`` =
distance / threshold (above 1: unfamiliar, which also means ``needs_review``).

Stored beside the model as ``familiarity.npz`` (means, precision matrix, threshold; :meth:`Familiarity.save`) and
shipped with it by the register step. Pure NumPy at scoring time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Familiarity:
    means: np.ndarray  # [C, D] class means of the train features (classes with no train image are left out)
    precision: np.ndarray  # [D, D] inverse of the shared (shrunk) covariance
    threshold: float  # distance above which an image is unfamiliar (quantile of val distances)
    quantile: float

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features [N, D]`` to the nearest class mean."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [n, {self.dim}], got {f.shape}")
        if not len(f):
            return np.zeros(0)
        fp = f @ self.precision  # [N, D]
        mp = self.means @ self.precision  # [C, D]
        d2 = (fp * f).sum(axis=1)[:, None] - 2.0 * fp @ self.means.T + (mp * self.means).sum(axis=1)[None, :]
        return np.sqrt(np.clip(d2.min(axis=1), 0.0, None))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance / threshold: above 1 is unfamiliar."""
        return self.distance(features) / self.threshold

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            np.savez_compressed(
                fh,
                means=self.means.astype(np.float32),
                precision=self.precision.astype(np.float32),
                threshold=np.float64(self.threshold),
                quantile=np.float64(self.quantile),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Familiarity:
        """Read a saved file; ``ValueError`` naming it when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                fam = cls(
                    means=np.asarray(data["means"], dtype=np.float64),
                    precision=np.asarray(data["precision"], dtype=np.float64),
                    threshold=float(data["threshold"]),
                    quantile=float(data["quantile"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a familiarity file ({exc})") from exc
        if fam.means.ndim != 2 or fam.precision.shape != (fam.dim, fam.dim) or not fam.threshold > 0:
            raise ValueError(f"{path}: inconsistent familiarity file (means {fam.means.shape}, "
                             f"precision {fam.precision.shape}, threshold {fam.threshold})")  # fmt: skip
        return fam


def fit_familiarity(
    train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray, quantile: float
) -> Familiarity:
    """Class means and shared covariance on train; the threshold at ``quantile`` of the val distances.

    Needs at least two train images; an empty val split falls back to the train distances for the threshold.
    """
    from sklearn.covariance import LedoitWolf  # lazy: only the evaluate stage fits

    f = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels, dtype=np.int64)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise ValueError(f"need at least two train feature rows matching the labels, got {f.shape} and {y.shape}")
    present = np.unique(y)
    means = np.stack([f[y == k].mean(axis=0) for k in present])
    centered = f - means[np.searchsorted(present, y)]
    precision = LedoitWolf(assume_centered=True).fit(centered).precision_
    draft = Familiarity(means, precision, 1.0, quantile)
    ref = np.asarray(val_features, dtype=np.float64)
    distances = draft.distance(ref if len(ref) else f)
    threshold = float(np.quantile(distances, quantile))
    if not threshold > 0:
        threshold = float(np.max(distances)) or 1.0
    return Familiarity(means, precision, threshold, quantile)


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of a score separating ``positive`` (should score higher) from ``negative``:
    the probability that a random positive outscores a random negative (ties count half)."""
    neg = np.asarray(negative, dtype=np.float64)
    pos = np.asarray(positive, dtype=np.float64)
    if not len(neg) or not len(pos):
        return float("nan")
    scores = np.concatenate([neg, pos])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks of ties
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))
