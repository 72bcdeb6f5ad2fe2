"""Abstention: which answers a microscopist should check, chosen on val so that the rest reach a target accuracy.

The model accepts an image when its (calibrated) top-1 confidence is at or above the **review threshold** and the
image is familiar (:mod:`emassist.model.familiarity`); everything else carries ``needs_review: true``. The evaluate
stage picks the threshold on the val split (:func:`choose_threshold`: the lowest confidence at which the accepted
val images reach ``evaluate.target_accuracy``), reports coverage and selective accuracy at it on test, and the whole
risk–coverage curve (:func:`risk_coverage`). The register step ships the threshold in the serving config, and the
pyfunc, the web page, the CLI and the tile scan decide with the one rule here (:class:`ReviewPolicy`).

Pure NumPy: the serving side uses the same code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Threshold of a model registered before abstention existed (it ships none): the old fixed "low confidence" flag.
LEGACY_REVIEW_THRESHOLD = 0.5


@dataclass(frozen=True)
class ThresholdChoice:
    """The review threshold picked on val, or ``threshold None`` when no threshold reaches the target."""

    threshold: float | None
    target_accuracy: float
    reached: bool
    val_coverage: float  # share of val images accepted at the threshold (0 when not reached)
    val_selective_accuracy: float  # accuracy of those (nan when none is accepted)
    n_val: int
    message: str  # one line for the log and the report

    def as_dict(self) -> dict[str, Any]:
        return {
            "review_threshold": self.threshold,
            "target_accuracy": self.target_accuracy,
            "target_reached": self.reached,
            "val_coverage": self.val_coverage,
            "val_selective_accuracy": self.val_selective_accuracy,
            "review_message": self.message,
        }


def _confidence_and_correct(proba: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} do not match")
    if not len(y):
        return np.zeros(0), np.zeros(0, dtype=bool)
    return p.max(axis=1), p.argmax(axis=1) == y


def risk_coverage(proba: np.ndarray, labels: np.ndarray, accept: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The risk–coverage curve: for each distinct confidence ``t`` (high to low), accepting ``confidence >= t``.

    Returns arrays ``threshold``, ``coverage`` (share accepted), ``selective_accuracy`` (accuracy of the accepted)
    and ``risk`` (1 - selective accuracy), one entry per distinct confidence. ``accept``: an extra mask (e.g. the
    familiar images); rejected images are never accepted but count in the coverage's denominator.
    """
    conf, correct = _confidence_and_correct(proba, labels)
    n = len(conf)
    if accept is not None:
        keep = np.asarray(accept, dtype=bool)
        conf, correct = conf[keep], correct[keep]
    if not len(conf):
        empty = np.zeros(0)
        return {"threshold": empty, "coverage": empty, "selective_accuracy": empty, "risk": empty}
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    cum_correct = np.cumsum(correct)
    accepted = np.arange(1, len(conf) + 1)
    # the last position of each distinct confidence: accepting >= t takes every tie of t
    last = np.r_[np.nonzero(np.diff(conf))[0], len(conf) - 1]
    sel = cum_correct[last] / accepted[last]
    return {
        "threshold": conf[last],
        "coverage": accepted[last] / n,
        "selective_accuracy": sel,
        "risk": 1.0 - sel,
    }


def choose_threshold(
    proba: np.ndarray,
    labels: np.ndarray,
    target_accuracy: float,
    *,
    classes: Sequence[str] | None = None,
    accept: np.ndarray | None = None,
) -> ThresholdChoice:
    """The lowest confidence threshold at which the accepted val images reach ``target_accuracy``.

    ``accept`` (optional): images to leave out whatever their confidence (the unfamiliar ones, which need review
    anyway). When no threshold reaches the target (or val is empty) the choice is ``threshold None``: every
    answer is flagged for review, and ``message`` says so. Classes with no val image are named in ``message``
    (their errors cannot be seen on val, so the threshold cannot account for them).
    """
    rc = risk_coverage(proba, labels, accept)
    n_val = len(np.asarray(labels))
    missing = ""
    p = np.asarray(proba)
    if classes is not None and p.ndim == 2:
        absent = sorted(set(range(p.shape[1])) - set(np.asarray(labels, dtype=np.int64).tolist()))
        if absent:
            missing = f"; the val split has no image of {', '.join(classes[k] for k in absent)}, so the threshold " \
                "does not account for that class's errors"  # fmt: skip
    ok = np.nonzero(rc["selective_accuracy"] >= target_accuracy)[0]
    if not len(ok):
        best = float(np.max(rc["selective_accuracy"])) if len(rc["threshold"]) else float("nan")
        message = (
            f"no confidence threshold reaches the target accuracy {target_accuracy:g} on val "
            f"({n_val} images; the best is {best:.4f}): every answer is flagged for review{missing}"
        )
        return ThresholdChoice(None, target_accuracy, False, 0.0, float("nan"), n_val, message)
    k = int(ok[-1])  # thresholds run high to low: the last that reaches the target is the lowest
    threshold = float(rc["threshold"][k])
    coverage, sel = float(rc["coverage"][k]), float(rc["selective_accuracy"][k])
    message = (
        f"review threshold {threshold:.4f}: {coverage:.1%} of {n_val} val images accepted at "
        f"{sel:.4f} accuracy (target {target_accuracy:g}){missing}"
    )
    return ThresholdChoice(threshold, target_accuracy, True, coverage, sel, n_val, message)


def selective_report(
    proba: np.ndarray, labels: np.ndarray, threshold: float | None, accept: np.ndarray | None = None
) -> dict[str, float]:
    """Coverage and selective accuracy on (say) test at ``threshold`` (None: nothing accepted)."""
    conf, correct = _confidence_and_correct(proba, labels)
    keep = np.zeros(len(conf), dtype=bool) if threshold is None else conf >= threshold
    if accept is not None:
        keep &= np.asarray(accept, dtype=bool)
    n = len(conf)
    return {
        "coverage": float(keep.sum() / n) if n else float("nan"),
        "selective_accuracy": float(correct[keep].mean()) if keep.any() else float("nan"),
        "n_accepted": int(keep.sum()),
    }


@dataclass(frozen=True)
class ReviewPolicy:
    """The one rule deciding ``needs_review`` wherever a prediction is shown.

    ``threshold None`` means "review everything" (no threshold reached the target on val). ``source`` says where
    the threshold comes from: ``model`` (fitted on val and shipped with it), ``override`` (``webapp.low_confidence``)
    or ``legacy`` (a model registered before abstention: the old fixed 0.5, labelled so).
    """

    threshold: float | None
    source: str = "model"
    target_accuracy: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], override: float | None = None) -> ReviewPolicy:
        """From a serving config (``review_threshold``, ``target_accuracy``, ``target_reached``); ``override`` wins."""
        target = config.get("target_accuracy")
        target = float(target) if isinstance(target, int | float) and not isinstance(target, bool) else None
        if override is not None:
            return cls(float(override), "override", target)
        if "review_threshold" not in config and "target_reached" not in config:
            return cls(LEGACY_REVIEW_THRESHOLD, "legacy", None)
        value = config.get("review_threshold")
        if value is None:
            return cls(None, "model", target)
        threshold = float(value)
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"review_threshold must be a confidence in [0, 1] or null, got {value!r}")
        return cls(threshold, "model", target)

    @classmethod
    def served(cls, config: Mapping[str, Any], override: float | None = None) -> ReviewPolicy:
        """:meth:`from_config` for a model being served: a review threshold that is not usable gives the legacy
        policy with one warning (serving it so beats not serving it); registering still refuses it."""
        try:
            return cls.from_config(config, override)
        except ValueError as exc:
            log.warning("the model's review threshold is unusable (%s): using the legacy %.2f", exc,
                        LEGACY_REVIEW_THRESHOLD)  # fmt: skip
            return cls.from_config({}, override)

    def decide(self, confidence: float, unfamiliar: bool = False) -> tuple[bool, str]:
        """``(needs_review, reason)``; the reason is "" when the answer is accepted."""
        if unfamiliar:
            return True, "unlike the training data (unfamiliar image)"
        if self.threshold is None:
            return True, (
                f"the model reaches no confidence at which its val accuracy meets the target {self.target_accuracy:g}: "
                "every answer needs review"
                if self.target_accuracy is not None
                else "every answer needs review"
            )
        if confidence < self.threshold:
            what = {"model": "the review threshold", "override": "the page's threshold (webapp.low_confidence)"}.get(
                self.source, "the default threshold (the model ships none)"
            )
            return True, f"confidence {confidence:.2f} is below {what} {self.threshold:.2f}"
        return False, ""

    def describe(self) -> str:
        """One line for a page header or a CLI: what the flag means for this model."""
        if self.threshold is None:
            return "every answer is flagged for review (no threshold reached the target accuracy on val)"
        if self.source == "override":
            return f"answers below {self.threshold:.0%} confidence are flagged for review (webapp.low_confidence)"
        if self.source == "legacy":
            return (
                f"answers below {self.threshold:.0%} confidence are flagged for review (a fixed default: this model "
                "was registered without a review threshold)"
            )
        target = f" (target accuracy {self.target_accuracy:g} on val)" if self.target_accuracy is not None else ""
        return f"answers below {self.threshold:.0%} confidence are flagged for review{target}"
