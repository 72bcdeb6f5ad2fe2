"""Temperature scaling (emassist.model.calibration), the reliability report, the serving config's temperature
(emassist.model.registry.serving_config) and the calibrated pyfunc (emassist.serve.pyfunc), in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from emassist.model.calibration import (
    apply_temperature,
    calibration_report,
    ece,
    fit_temperature,
    nll,
    reliability_table,
)
from tests.helpers import BRIGHTNESS_CLASSES, brightness_model, image_bytes


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _calibrated_set(n: int = 3000, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are calibrated by construction: labels drawn from them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    proba = _softmax(z)
    labels = np.array([rng.choice(k, p=p) for p in proba])
    return proba, labels


def test_over_confident_toy_set_recovers_temperature_above_one_and_lowers_ece() -> None:
    proba, labels = _calibrated_set()
    over = _softmax(np.log(proba) * 3.0)  # logits sharpened 3x: over-confident
    temperature = fit_temperature(over, labels)
    assert temperature > 1.0
    assert temperature == pytest.approx(3.0, rel=0.15)
    after = apply_temperature(over, temperature)
    assert ece(after, labels) < 0.5 * ece(over, labels)
    assert nll(after, labels) < nll(over, labels)


def test_under_confident_set_gives_temperature_below_one() -> None:
    proba, labels = _calibrated_set(seed=1)
    under = _softmax(np.log(proba) / 2.0)
    assert fit_temperature(under, labels) < 1.0


def test_ece_equals_hand_computed_value() -> None:
    # 4 examples, 2 classes, bins of width 0.5: (0, 0.5] and (0.5, 1]
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 0])
    # all confidences > 0.5 -> one bin: confidence (0.9+0.8+0.6+0.7)/4 = 0.75, accuracy 2/4 -> ECE 0.25
    assert ece(proba, labels, bins=2) == pytest.approx(0.25)
    # 10 bins: (0.8, 0.9]: 0.9 right; (0.7, 0.8]: 0.8 wrong; (0.5, 0.6]: 0.6 right; (0.6, 0.7]: 0.7 wrong
    # ECE = (|1-0.9| + |0-0.8| + |1-0.6| + |0-0.7|) / 4 = (0.1+0.8+0.4+0.7)/4 = 0.5
    assert ece(proba, labels, bins=10) == pytest.approx(0.5)
    table = reliability_table(proba, labels, bins=10)
    assert [row["count"] for row in table] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert sum(row["count"] for row in table) == 4


def test_nll_hand_computed() -> None:
    proba = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert nll(proba, np.array([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)


def test_apply_temperature_is_softmax_of_log_p_over_t() -> None:
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    t = 2.5
    expected = _softmax(np.log(proba) / t)
    np.testing.assert_allclose(apply_temperature(proba, t), expected, rtol=1e-12)
    np.testing.assert_allclose(apply_temperature(proba, 1.0), proba, rtol=1e-12)
    assert (apply_temperature(proba, t).argmax(axis=1) == proba.argmax(axis=1)).all()
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(proba, 0.0)


def test_fit_with_a_class_missing_from_val() -> None:
    proba, labels = _calibrated_set(k=3, seed=2)
    keep = labels != 2  # no example of class 2
    over = _softmax(np.log(proba[keep]) * 2.0)
    temperature = fit_temperature(over, labels[keep])
    assert math.isfinite(temperature) and temperature > 1.0
    report = calibration_report((labels[keep], over), (labels, _softmax(np.log(proba) * 2.0)))
    assert report["val_classes_missing"] == [2]
    assert report["ece_after"] < report["ece_before"]
    assert report["nll_after"] < report["nll_before"]


def test_fit_on_no_examples_is_one() -> None:
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0


def test_fit_never_worse_than_uncalibrated() -> None:
    proba, labels = _calibrated_set(seed=3)
    temperature = fit_temperature(proba, labels)
    assert nll(apply_temperature(proba, temperature), labels) <= nll(proba, labels) + 1e-12


def test_reliability_files(tmp_path: Path) -> None:
    from emassist.model.reliability import write_reliability

    proba, labels = _calibrated_set(n=500)
    over = _softmax(np.log(proba) * 3.0)
    paths = write_reliability(tmp_path, over, labels, 3.0, bins=15)
    frame = pd.read_csv(paths["reliability"])
    assert set(frame["curve"]) == {"uncalibrated", "calibrated"}
    assert len(frame) == 30
    assert frame.groupby("curve")["count"].sum().tolist() == [500, 500]
    assert paths["reliability_diagram"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- serving


def _params(tmp_path: Path) -> Any:
    from emassist.config.settings import params_from_dict

    return params_from_dict(
        {
            "data": {"classes": BRIGHTNESS_CLASSES},
            "ingest": {"cache_size": 64, "max_pixels": 4_000_000, "min_side": 16},
            "train": {"image_size": 32},
        }
    )


def test_serving_config_carries_the_temperature_when_the_file_exists(tmp_path: Path) -> None:
    from emassist.model.registry import serving_config

    params = _params(tmp_path)
    assert "temperature" not in serving_config(params)
    assert "temperature" not in serving_config(params, tmp_path / "missing.json")
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"temperature": 1.7, "ece_before": 0.1}))
    assert serving_config(params, calibration)["temperature"] == 1.7
    calibration.write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match=r"calibration\.json"):
        serving_config(params, calibration)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("keras")
    return brightness_model(tmp_path_factory.mktemp("calibration") / "model.keras", conv=True)


def test_pyfunc_with_temperature_returns_softmax_of_log_p_over_t(keras_model: Path, tmp_path: Path) -> None:
    from emassist.model.registry import serving_config
    from emassist.serve.pyfunc import SemClassifier

    config = serving_config(_params(tmp_path))
    raw = SemClassifier.from_files(keras_model, config)
    calibrated = SemClassifier.from_files(keras_model, {**config, "temperature": 2.0})
    assert (raw.temperature, raw.calibrated) == (1.0, False)
    assert (calibrated.temperature, calibrated.calibrated) == (2.0, True)

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(5, 64, 64), dtype=np.uint8)
    p_raw = raw.probabilities(gray)
    p_cal = calibrated.probabilities(gray)
    np.testing.assert_allclose(p_cal, _softmax(np.log(p_raw.astype(np.float64)) / 2.0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(p_cal, p_raw)
    np.testing.assert_allclose(p_cal.sum(axis=1), 1.0, rtol=1e-5)

    # through predict (the scoring server's path): the probability columns and confidence are calibrated
    import base64

    values = [base64.b64encode(image_bytes("png", seed=s, level=40 + 80 * s)).decode() for s in range(3)]
    frame_raw = raw.predict(None, pd.DataFrame({"image": values}))
    frame_cal = calibrated.predict(None, pd.DataFrame({"image": values}))
    assert list(frame_cal.columns) == list(frame_raw.columns)
    expected = _softmax(np.log(frame_raw[BRIGHTNESS_CLASSES].to_numpy()) / 2.0)
    np.testing.assert_allclose(frame_cal[BRIGHTNESS_CLASSES].to_numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(frame_cal["confidence"], expected.max(axis=1), rtol=1e-4, atol=1e-6)
    assert (frame_cal["label"] == frame_raw["label"]).all()


def test_old_config_without_temperature_serves_raw_probabilities(keras_model: Path, tmp_path: Path) -> None:
    import keras

    from emassist.model.registry import serving_config
    from emassist.serve.pyfunc import SemClassifier

    config = serving_config(_params(tmp_path))
    assert "temperature" not in config
    model = SemClassifier.from_files(keras_model, config)
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(4, 64, 64, 1), dtype=np.uint8)
    direct = np.asarray(keras.models.load_model(keras_model, compile=False)(model.preprocessor.to_model_input(gray)))
    np.testing.assert_allclose(model.probabilities(gray), direct, rtol=1e-5, atol=1e-6)
    # an unusable temperature is served uncalibrated too, never a crash
    for bad in ("abc", 0, -2.0, float("nan")):
        odd = SemClassifier()
        odd.configure({**config, "temperature": bad})
        assert (odd.temperature, odd.calibrated) == (1.0, False)
