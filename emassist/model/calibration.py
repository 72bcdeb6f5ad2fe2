"""Temperature scaling (Guo et al., 2017): one parameter fitted on the val split, reported on test.

The model ends in a softmax, so its log-probabilities serve as logits: the calibrated probabilities are
``softmax(log p / T)``. ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one,
``T = 1`` leaves it as it is. Pure NumPy (no TensorFlow): the serving side applies the same function.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DEFAULT_BINS = 15
LOG_T_BOUNDS = (-4.0, 4.0)  # T between about 0.018 and 55
EPS = 1e-12


def as_temperature(value: Any) -> float:
    """``value`` as a temperature: a positive finite number, else ``ValueError`` (the one check of a temperature,
    wherever one is read: the calibration file, a serving config, a call)."""
    try:
        temperature = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"temperature must be a positive number, got {value!r}") from exc
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {value!r}")
    return temperature


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row; ``T = 1`` returns the probabilities unchanged (renormalised)."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected probabilities of shape [n, classes], got {p.shape}")
    temperature = as_temperature(temperature)
    logits = np.log(np.clip(p, EPS, None)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True) if len(logits) else 0.0
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def nll(proba: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, None))))


def ece(proba: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error: bin by confidence (``bins`` equal-width bins of (0, 1]), then the
    example-weighted mean of |accuracy - mean confidence| over the bins."""
    table = reliability_table(proba, labels, bins)
    n = sum(row["count"] for row in table)
    if n == 0:
        return float("nan")
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"]) / n)


def reliability_table(proba: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> list[dict[str, Any]]:
    """One row per confidence bin: its bounds, count, accuracy and mean confidence (0 for an empty bin)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == y) if len(p) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin k holds (edges[k], edges[k+1]]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    rows = []
    for k in range(bins):
        mask = index == k
        count = int(mask.sum())
        rows.append(
            {
                "bin_lower": float(edges[k]),
                "bin_upper": float(edges[k + 1]),
                "bin_center": float((edges[k] + edges[k + 1]) / 2),
                "count": count,
                "accuracy": float(correct[mask].mean()) if count else 0.0,
                "confidence": float(conf[mask].mean()) if count else 0.0,
            }
        )
    return rows


def fit_temperature(proba: np.ndarray, labels: np.ndarray, *, tol: float = 1e-5, max_iter: int = 200) -> float:
    """The temperature minimising the NLL of ``softmax(log p / T)`` on (proba, labels).

    Golden-section search on ``log T`` (the NLL is convex in ``1/T``, hence unimodal in ``log T``). Classes
    missing from ``labels`` are fine: only the true classes' probabilities enter the NLL. No examples: ``T = 1``.
    """
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} do not match")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]})")

    def loss(log_t: float) -> float:
        return nll(apply_temperature(p, math.exp(log_t)), y)

    a, b = LOG_T_BOUNDS
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(max_iter):
        if b - a < tol:
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    best = (a + b) / 2.0
    # never worse than leaving the model alone
    return float(math.exp(best)) if loss(best) <= loss(0.0) else 1.0


def calibration_report(
    val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """Fit T on val ``(labels, proba)``; ECE and NLL on test ``(labels, proba)`` before and after."""
    y_val, p_val = val
    y_test, p_test = test
    temperature = fit_temperature(p_val, y_val)
    calibrated = apply_temperature(p_test, temperature)
    return {
        "temperature": temperature,
        "bins": bins,
        "n_val": len(y_val),
        "val_classes_missing": sorted(set(range(np.asarray(p_val).shape[1])) - set(np.asarray(y_val).tolist()))
        if np.asarray(p_val).ndim == 2
        else [],
        "ece_before": ece(p_test, y_test, bins),
        "ece_after": ece(calibrated, y_test, bins),
        "nll_before": nll(p_test, y_test),
        "nll_after": nll(calibrated, y_test),
    }
