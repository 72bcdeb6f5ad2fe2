"""Abstention: the review threshold search, the risk–coverage curve and the one review rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emassist.model.selective import (
    LEGACY_REVIEW_THRESHOLD,
    ReviewPolicy,
    choose_threshold,
    risk_coverage,
    selective_report,
)


def _two_class(confidences: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose top-1 confidence is as given; label 0 where correct, 1 where not (top-1 is class 0)."""
    c = np.asarray(confidences)
    proba = np.stack([c, 1.0 - c], axis=1)
    labels = np.where(np.asarray(correct), 0, 1)
    return proba, labels


def test_threshold_search_on_a_known_list() -> None:
    # sorted high to low: 0.99 ok, 0.95 ok, 0.9 WRONG, 0.85 ok, 0.8 ok, 0.7 wrong, 0.6 ok
    proba, labels = _two_class([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6], [True, True, False, True, True, False, True])
    # accepting >= 0.8: 4 of 5 right = 0.8; >= 0.6: 5/7 = 0.714; >= 0.95: 1.0
    choice = choose_threshold(proba, labels, 0.8)
    assert choice.reached and choice.threshold == pytest.approx(0.8)
    assert choice.val_coverage == pytest.approx(5 / 7) and choice.val_selective_accuracy == pytest.approx(0.8)
    choice = choose_threshold(proba, labels, 0.99)
    assert choice.threshold == pytest.approx(0.95) and choice.val_coverage == pytest.approx(2 / 7)
    choice = choose_threshold(proba, labels, 0.7)
    assert choice.threshold == pytest.approx(0.6) and choice.val_coverage == 1.0  # everything accepted


def test_ties_are_accepted_together() -> None:
    proba, labels = _two_class([0.9, 0.9, 0.9, 0.5], [True, False, True, True])
    rc = risk_coverage(proba, labels)
    assert rc["threshold"].tolist() == [0.9, 0.5]
    assert rc["coverage"].tolist() == [0.75, 1.0]
    assert rc["selective_accuracy"] == pytest.approx([2 / 3, 0.75])


def test_unreachable_target_flags_everything_with_a_clear_message() -> None:
    proba, labels = _two_class([0.9, 0.8, 0.7], [False, True, False])
    choice = choose_threshold(proba, labels, 0.99)
    assert not choice.reached and choice.threshold is None and choice.val_coverage == 0.0
    assert "no confidence threshold reaches the target accuracy 0.99" in choice.message
    assert "every answer is flagged for review" in choice.message
    policy = ReviewPolicy.from_config(choice.as_dict())
    assert policy.threshold is None and policy.decide(0.999)[0] is True
    report = selective_report(proba, labels, None)
    assert report["coverage"] == 0.0 and math.isnan(report["selective_accuracy"])


def test_missing_val_class_is_named() -> None:
    proba = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    choice = choose_threshold(proba, np.array([0, 0]), 0.9, classes=["Fibres", "Tips", "Powder"])
    assert choice.reached
    assert "no image of Tips, Powder" in choice.message


def test_accept_mask_keeps_unfamiliar_images_out() -> None:
    proba, labels = _two_class([0.99, 0.95, 0.9], [False, True, True])
    assert not choose_threshold(proba, labels, 0.99).reached
    familiar = np.array([False, True, True])  # the confident mistake was unfamiliar: flagged anyway
    choice = choose_threshold(proba, labels, 0.99, accept=familiar)
    assert choice.threshold == pytest.approx(0.9) and choice.val_coverage == pytest.approx(2 / 3)
    at = selective_report(proba, labels, 0.9, accept=familiar)
    assert at == {"coverage": pytest.approx(2 / 3), "selective_accuracy": 1.0, "n_accepted": 2}


def test_review_policy_sources_and_reasons() -> None:
    legacy = ReviewPolicy.from_config({"classes": ["A"]})
    assert (legacy.threshold, legacy.source) == (LEGACY_REVIEW_THRESHOLD, "legacy")
    assert "registered without a review threshold" in legacy.describe()
    model = ReviewPolicy.from_config({"review_threshold": 0.8, "target_accuracy": 0.99, "target_reached": True})
    assert model.decide(0.85) == (False, "")
    needs, reason = model.decide(0.7)
    assert needs and "0.70 is below the review threshold 0.80" in reason
    assert model.decide(0.95, unfamiliar=True)[0] is True
    override = ReviewPolicy.from_config({"review_threshold": 0.8}, override=0.3)
    assert override.source == "override" and override.decide(0.5) == (False, "")
    with pytest.raises(ValueError, match="review_threshold"):
        ReviewPolicy.from_config({"review_threshold": 1.5})


def test_trust_report_completes_with_a_missing_val_class_and_an_unreachable_target() -> None:
    from emassist.config.settings import params_from_dict
    from emassist.model.testset import trust_report

    rng = np.random.default_rng(0)
    params = params_from_dict({"data": {"classes": ["Fibres", "Tips", "Powder"]}, "evaluate": {"target_accuracy": 1.0}})
    train_y = rng.integers(0, 3, 90)
    train_f = rng.normal(size=(90, 4)) + train_y[:, None] * 3.0
    val_y = np.array([0, 0, 1, 1, 0, 1])  # no Powder in val
    val_p = np.tile([0.6, 0.3, 0.1], (6, 1))  # always "Fibres": half of val wrong, no threshold reaches 1.0
    val_f = rng.normal(size=(6, 4)) + val_y[:, None] * 3.0
    test = (np.array([0, 1]), np.tile([0.6, 0.3, 0.1], (2, 1)), rng.normal(size=(2, 4)))
    familiarity, choice, report = trust_report(params, (val_y, val_p, val_f), test, (train_y, train_f), 1.0)
    assert not choice.reached and report["review_threshold"] is None and report["coverage"] == 0.0
    assert "no image of Powder" in choice.message and "every answer is flagged for review" in choice.message
    assert familiarity.means.shape == (3, 4) and report["unfamiliar_threshold"] > 0


def test_a_served_model_with_an_unusable_threshold_gets_the_legacy_policy(caplog: pytest.LogCaptureFixture) -> None:
    from emassist.serve.predict import training_data_lines

    caplog.set_level("WARNING", logger="emassist.model.selective")
    policy = ReviewPolicy.served({"review_threshold": 1.5})
    assert (policy.threshold, policy.source) == (LEGACY_REVIEW_THRESHOLD, "legacy")
    assert sum("review threshold is unusable" in r.getMessage() for r in caplog.records) == 1
    assert ReviewPolicy.served({"review_threshold": 1.5}, override=0.3).source == "override"
    assert ReviewPolicy.served({"review_threshold": 0.8}).threshold == 0.8
    # `emassist predict`'s header for such a model: said, not a crash
    assert any("registered without a review threshold" in line for line in training_data_lines({"review_threshold": 2}))
