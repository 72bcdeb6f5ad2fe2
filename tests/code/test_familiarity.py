"""The familiarity score: Mahalanobis distance to the nearest class mean, threshold on val, saved and loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emassist.model.familiarity import Familiarity, auroc, fit_familiarity


def _clusters(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + rng.normal(0, 1.0, (n, centres.shape[1])), labels


def test_far_points_score_above_one_and_val_quantile_holds() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 16))
    train, y = _clusters(rng, 600, centres)
    val, _ = _clusters(rng, 400, centres)
    fam = fit_familiarity(train, y, val, quantile=0.95)
    assert np.mean(fam.score(val) <= 1.0) == pytest.approx(0.95, abs=0.01)
    strangers = rng.normal(0, 5, (50, 16)) + 40.0
    assert np.all(fam.score(strangers) > 1.0)
    fresh, _ = _clusters(rng, 400, centres)
    assert np.mean(fam.score(fresh) <= 1.0) > 0.85
    assert auroc(fam.score(fresh), fam.score(strangers)) == 1.0


def test_distance_equals_the_definition() -> None:
    rng = np.random.default_rng(1)
    means = rng.normal(size=(2, 4))
    a = rng.normal(size=(4, 4))
    precision = a @ a.T + np.eye(4)
    fam = Familiarity(means, precision, 2.0, 0.9)
    x = rng.normal(size=(5, 4))
    expected = [min(float((v - m) @ precision @ (v - m)) for m in means) ** 0.5 for v in x]
    assert fam.distance(x) == pytest.approx(expected)
    assert fam.score(x) == pytest.approx(np.array(expected) / 2.0)


def test_save_load_round_trip_and_a_bad_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train = rng.normal(size=(50, 8))
    fam = fit_familiarity(train, rng.integers(0, 2, 50), train[:10], 0.99)
    back = Familiarity.load(fam.save(tmp_path / "f.npz"))
    assert back.threshold == pytest.approx(fam.threshold) and back.quantile == 0.99
    assert back.score(train[:5]) == pytest.approx(fam.score(train[:5]), rel=1e-4)
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"bad\.npz: not a familiarity file"):
        Familiarity.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="features of shape"):
        fam.distance(np.zeros((1, 3)))


def test_a_class_missing_from_train_is_left_out() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(40, 4))
    fam = fit_familiarity(train, np.where(np.arange(40) < 20, 0, 2), train, 0.9)  # class 1 absent
    assert fam.means.shape == (2, 4)


def test_auroc_matches_hand_values() -> None:
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.1, 0.5]), np.array([0.5, 0.2])) == pytest.approx(0.625)  # one tie counts half
