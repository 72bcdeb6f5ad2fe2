"""Grad-CAM on every model builder, the tile scan's grid and heat map, the webapp params and the page's helpers.

Fast and in-process: models are built (not trained) or hand-weighted so the expected answer is known. The real
trained champion, the running web server and the browser are in ``tests/test_webapp.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("keras")

from emassist.config.settings import ParamsError, params_from_dict
from emassist.data.preprocess import Preprocessor
from emassist.model.provenance import DEMO_NOTICE
from emassist.serve import tilescan
from emassist.serve.backend import Answer, Backend


def _noise(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ Grad-CAM


@pytest.mark.parametrize(
    ("name", "size", "layer"),
    [
        ("simple_cnn", 32, "conv2"),
        ("compact_cnn", 32, "stage3_relu"),
        ("xception", 71, "xception_base/block14_sepconv2_act"),
    ],
)
def test_gradcam_finds_last_conv_layer_and_gives_a_unit_map(name: str, size: int, layer: str) -> None:
    from emassist.model.builders import build_model
    from emassist.serve.gradcam import GradCam, find_target_layer

    model = build_model(name, num_classes=3, image_size=size)
    assert find_target_layer(model) == layer
    cam = GradCam(model)
    gray = _noise(80)
    heat, k = cam(gray)
    assert heat.shape == gray.shape
    assert heat.dtype == np.float32
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    assert 0 <= k < 3
    heat2, k2 = cam(gray, 2)
    assert k2 == 2 and heat2.shape == gray.shape


def _brightness_conv_model(size: int = 32) -> Any:
    """Conv (box filter, ReLU) → GAP → softmax Dense: class 0's logit grows with brightness, class 1's falls."""
    import keras

    inp = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="relu", name="conv")
    x = conv(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    model = keras.Model(inp, dense(x))
    conv.set_weights([np.full((3, 3, 3, 1), 1.0 / 27, dtype=np.float32), np.zeros(1, dtype=np.float32)])
    dense.set_weights([np.array([[4.0, -4.0]], dtype=np.float32), np.zeros(2, dtype=np.float32)])
    return model


def test_gradcam_points_at_the_evidence() -> None:
    """Only the left half is bright: the map for 'bright' (class 0) lies on the left, even when saturated."""
    from emassist.serve.gradcam import GradCam

    gray = np.zeros((64, 64), dtype=np.uint8)
    gray[:, :32] = 250
    cam = GradCam(_brightness_conv_model())
    assert cam.layer_name == "conv"
    heat, k = cam(gray, 0)
    assert k == 0
    assert heat[:, :28].mean() > 0.8
    assert heat[:, 36:].mean() < 0.1


def test_gradcam_refuses_a_model_without_conv_layers() -> None:
    import keras

    from emassist.serve.gradcam import GradCam, GradCamError

    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inp)))
    with pytest.raises(GradCamError, match="no convolutional layer"):
        GradCam(model)


def test_overlay_and_colorize() -> None:
    from emassist.serve.drawing import colorize, overlay

    heat = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    rgb = colorize(heat)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert rgb[-1, -1].sum() > rgb[0, 0].sum()  # inferno: dark at 0, bright at 1
    blended = overlay(np.full((20, 30), 128, dtype=np.uint8), heat)
    assert blended.shape == (20, 30, 3)


# ------------------------------------------------------------------------------------------------ tile scan


def test_positions_cover_the_whole_axis() -> None:
    assert tilescan.positions(512, 128, 64) == [0, 64, 128, 192, 256, 320, 384]
    assert tilescan.positions(500, 128, 64)[-1] == 500 - 128
    assert tilescan.positions(100, 128, 64) == [0]
    assert tilescan.positions(128, 128, 128) == [0]


def _pre(cache_size: int, crop_databar: bool = False) -> Preprocessor:
    return Preprocessor(cache_size, crop_databar, max_pixels=10**8, min_side=16)


def _brightness_predict(tiles: np.ndarray) -> np.ndarray:
    p = tiles.reshape(len(tiles), -1).mean(axis=1) / 255.0
    return np.stack([1 - p, p], axis=1)


def test_scan_grid_shape_and_heat_higher_where_the_class_is() -> None:
    gray = np.full((300, 520), 20, dtype=np.uint8)
    gray[:, 260:] = 230  # the "bright" class on the right
    calls: list[int] = []

    def predict(tiles: np.ndarray) -> np.ndarray:
        calls.append(len(tiles))
        assert tiles.dtype == np.uint8 and tiles.shape[1:] == (64, 64)
        return _brightness_predict(tiles)

    res = tilescan.scan(gray, predict, ["dark", "bright"], tile=128, stride=64, preprocessor=_pre(64),
                        batch_size=8)  # fmt: skip
    rows, cols = len(tilescan.positions(300, 128, 64)), len(tilescan.positions(520, 128, 64))
    assert res.scores.shape == (rows, cols, 2)
    assert res.n_tiles == rows * cols == sum(calls)
    assert max(calls) <= 8
    heat = tilescan.heatmap(res, "bright")
    assert heat.shape == (300, 520)
    assert heat[:, 400:].mean() > 0.8 > 0.2 > heat[:, :120].mean()
    rgb = tilescan.heatmap_overlay(gray, res, "bright")
    assert rgb.shape == (300, 520, 3)
    text = res.csv_text().splitlines()
    assert text[0] == "row,col,x,y,width,height,label,dark,bright"
    assert len(text) == 1 + rows * cols
    with pytest.raises(tilescan.ScanError, match="unknown class"):
        tilescan.heatmap(res, "Nope")


def test_scan_crops_the_databar_once_and_cuts_tiles_from_that_image() -> None:
    rng = np.random.default_rng(5)
    gray = rng.normal(120, 30, (300, 256)).clip(0, 255).astype(np.uint8)
    gray[-30:] = 0  # a dark data bar with text-like marks
    gray[-20:-14, 10:200:3] = 255
    pre = _pre(32, crop_databar=True)
    seen: list[np.ndarray] = []

    def predict(tiles: np.ndarray) -> np.ndarray:
        seen.append(tiles.copy())
        return _brightness_predict(tiles)

    res = tilescan.scan(gray, predict, ["dark", "bright"], tile=128, stride=128, preprocessor=pre)
    full, rows = pre.crop(gray)
    assert res.databar_rows == rows > 0 and res.height == full.shape[0] == 300 - rows
    corners = [(y, x) for y in res.ys for x in res.xs]
    np.testing.assert_array_equal(np.concatenate(seen), pre.tiles(full, corners, 128))


def test_heatmap_is_downscaled_for_large_images() -> None:
    gray = np.tile(np.linspace(0, 255, 2000), (3000, 1)).astype(np.uint8)  # a ramp: not featureless
    res = tilescan.scan(gray, _brightness_predict, ["dark", "bright"], tile=500, stride=500,
                        preprocessor=_pre(32))  # fmt: skip
    heat = tilescan.heatmap(res, "dark")
    assert max(heat.shape) <= tilescan.HEAT_MAX_SIDE
    assert abs(heat.shape[0] / heat.shape[1] - 1.5) < 0.01


@pytest.mark.parametrize(
    ("tile", "stride", "match"),
    [(8, 4, "tile: must be an integer >= 16"), (64, 0, "stride: must be"), (64, 65, "larger than the tile")],
)
def test_scan_options_are_checked(tile: int, stride: int, match: str) -> None:
    with pytest.raises(tilescan.ScanError, match=match):
        tilescan.check_options(tile, stride)


def test_scan_refuses_too_many_tiles() -> None:
    with pytest.raises(tilescan.ScanError, match="more than the limit of 10"):
        tilescan.check_options(16, 1, max_tiles=10, shape=(100, 100))


# ------------------------------------------------------------------------------------------------ params


def test_webapp_params_defaults_and_errors() -> None:
    params = params_from_dict({})
    assert params.webapp.source == "registry" and params.webapp.alias == "champion"
    with pytest.raises(ParamsError, match=r"webapp\.tile_stride"):
        params_from_dict({"webapp": {"tile_size": 64, "tile_stride": 128}})
    with pytest.raises(ParamsError, match=r"webapp\.source"):
        params_from_dict({"webapp": {"source": "s3"}})
    with pytest.raises(ParamsError, match=r"webapp\.low_confidence"):
        params_from_dict({"webapp": {"low_confidence": 1.5}})
    with pytest.raises(ParamsError, match=r"webapp\.endpoint_url"):
        params_from_dict({"webapp": {"endpoint_url": "localhost:5001"}})


# ------------------------------------------------------------------------------------------------ page helpers


class _FixedBackend(Backend):
    """Answers fixed probabilities (the real model behind the real server is in tests/test_webapp.py)."""

    def __init__(
        self, proba: list[float], config: dict[str, Any] | None = None, unfamiliar: bool | None = None
    ) -> None:
        from emassist.serve.backend import ModelInfo

        self.info = ModelInfo("m", "7", "champion", "registry", "models:/m/7")
        self.classes = ["A", "B", "C", "D"]
        self.preprocessor = _pre(32)
        self.proba = np.array(proba, dtype=np.float32)
        self.config = dict(config or {})
        self.unfamiliar = unfamiliar

    def classify_file(self, data: bytes, gray: np.ndarray) -> Answer:
        return Answer(self.proba, self.unfamiliar, 2.0 if self.unfamiliar else 0.5)

    def probabilities(self, gray: np.ndarray) -> np.ndarray:
        return np.tile(self.proba, (len(gray), 1))


def _png(side: int = 40) -> bytes:
    from emassist.serve.drawing import png_bytes

    return png_bytes(_noise(side))


@pytest.mark.parametrize(("proba", "low"), [([0.45, 0.35, 0.15, 0.05], True), ([0.9, 0.05, 0.03, 0.02], False)])
def test_review_flag_follows_the_page_override(proba: list[float], low: bool) -> None:
    from serving.webapp.app import WebApp

    config = {"review_threshold": 0.95, "target_accuracy": 0.99, "target_reached": True}
    app = WebApp(params_from_dict({"webapp": {"low_confidence": 0.5}}), _FixedBackend(proba, config))  # type: ignore[arg-type]
    out = app.classify(_png(), "a.png")
    assert out["needs_review"] is low
    assert ("webapp.low_confidence" in out["review_reason"]) is low
    assert [t["class"] for t in out["top"]] == ["A", "B", "C"]
    assert out["model"]["version"] == "7"
    csv_text = app.results_csv(None)
    assert csv_text.splitlines()[0].startswith("filename,label,confidence,needs_review,review_reason,unfamiliar,")
    assert csv_text.splitlines()[1].startswith(f"a.png,A,{proba[0]:.6f},{low},")
    assert app.info()["review"]["source"] == "override"


def test_review_flag_uses_the_models_threshold_and_the_unfamiliar_flag() -> None:
    from serving.webapp.app import WebApp

    config = {"review_threshold": 0.8, "target_accuracy": 0.99, "target_reached": True, "temperature": 1.3,
              "familiarity": "familiarity.npz"}  # fmt: skip
    confident = [0.9, 0.05, 0.03, 0.02]
    app = WebApp(params_from_dict({}), _FixedBackend(confident, config, unfamiliar=False))  # type: ignore[arg-type]
    out = app.classify(_png(), "a.png")
    assert (out["needs_review"], out["unfamiliar"]) == (False, False)
    info = app.info()
    assert info["review"]["threshold"] == 0.8 and info["review"]["source"] == "model" and info["calibrated"]
    assert info["familiarity_checked"] is True
    strange = WebApp(params_from_dict({}), _FixedBackend(confident, config, unfamiliar=True))  # type: ignore[arg-type]
    out = strange.classify(_png(), "b.png")
    assert out["needs_review"] is True and out["unfamiliar"] is True and "unfamiliar" in out["review_reason"]
    unsure = WebApp(params_from_dict({}), _FixedBackend([0.7, 0.1, 0.1, 0.1], config, False))  # type: ignore[arg-type]
    assert unsure.classify(_png(), "c.png")["needs_review"] is True


def test_a_model_without_trust_data_is_served_and_labelled() -> None:
    from serving.webapp.app import WebApp

    app = WebApp(params_from_dict({}), _FixedBackend([0.6, 0.2, 0.1, 0.1]))  # type: ignore[arg-type]
    out = app.classify(_png(), "a.png")
    assert out["needs_review"] is False and out["unfamiliar"] is None  # 0.6 >= the legacy 0.5; no familiarity check
    info = app.info()
    assert info["review"]["source"] == "legacy" and "registered without a review threshold" in info["review"]["text"]
    assert info["calibrated"] is False and info["familiarity_checked"] is False
    assert "not recorded" in info["training_data"]["text"]


def test_demo_trained_model_carries_the_notice() -> None:
    from serving.webapp.app import WebApp

    config = {"training_data": {"source": "demo", "version": "abc", "synthetic": True, "notice": DEMO_NOTICE}}
    info = WebApp(params_from_dict({}), _FixedBackend([0.6, 0.2, 0.1, 0.1], config)).info()  # type: ignore[arg-type]
    assert info["training_data"]["notice"] == DEMO_NOTICE and "not meant for real micrographs" in DEMO_NOTICE
    assert info["training_data"]["text"].startswith("training data: demo (version abc)")


def test_reject_status_by_reason() -> None:
    from serving.webapp.app import reject_status

    assert reject_status("not an image (content is text)") == 415
    assert reject_status("decompression bomb: 5000x5000 exceeds max_pixels=1000") == 413
    assert reject_status("too small: 4x4 (min_side=16)") == 422
    assert reject_status("truncated PNG: image file is truncated") == 422


# ------------------------------------------------------------------------------------------------ log + corrections


def _until(check: Any, timeout: float = 30.0) -> bool:
    """Poll ``check`` until true (the writer flushes on its own thread; a second flush from here could race it)."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _logged_app(tmp_path: Any, db_uri: str | None = None, **monitoring: Any) -> Any:
    from serving.webapp.app import WebApp

    raw = {"monitoring": {"db_uri": db_uri or f"sqlite:///{tmp_path / 'log.db'}", "flush_interval_s": 0.05,
                          "feedback_dir": str(tmp_path / "feedback"), **monitoring}}  # fmt: skip
    app = WebApp(params_from_dict(raw), _FixedBackend([0.2, 0.7, 0.05, 0.05], {"review_threshold": 0.9}, False))  # type: ignore[arg-type]
    app.open_log()
    return app


def test_every_answer_is_logged_and_a_correction_stores_the_upload(tmp_path: Any, monkeypatch: Any) -> None:
    import hashlib

    monkeypatch.delenv("EMASSIST_MONITORING_DB_URI", raising=False)
    app = _logged_app(tmp_path)
    data = _png(48)
    try:
        out = app.classify(data, "scan 7.png")
        assert out["sha256"] == hashlib.sha256(data).hexdigest() and out["corrected"] == ""
        writer = app.log_writer
        assert writer is not None and _until(lambda: writer.stats["written"] >= 1)
        rows = app.store.predictions()
        assert len(rows) == 1
        row = rows.iloc[0]
        assert (row.source, row.sha256, row.origin, row.format, row.width, row.label) == (
            "web", out["sha256"], "scan 7.png", "PNG", 48, "B")  # fmt: skip
        assert (row.model_name, row.model_version, row.model_alias) == ("m", "7", "champion")
        assert bool(row.needs_review) is True and bool(row.unfamiliar) is False and row.contrast > 0
        done = app.correct({"id": out["id"], "label": "C", "who": "Ada"})
        assert done["status"] == "stored" and done["label"] == "C"
        stored = tmp_path / "feedback" / "C" / f"{out['sha256']}.png"
        assert done["path"] == stored.as_posix() and stored.read_bytes() == data  # the original bytes
        fix = app.store.corrections().iloc[0]
        assert (fix.old_label, fix.new_label, fix.who, fix.model_version) == ("B", "C", "Ada", "7")
        assert app.result_json(app.results[out["id"]])["corrected"] == "C"
        assert app.correct({"id": out["id"], "label": "C", "who": "Bob"})["status"] == "repeat"
        assert len(app.store.corrections()) == 1
    finally:
        app.close_log()


def test_bad_corrections_get_a_status_and_a_message(tmp_path: Any, monkeypatch: Any) -> None:
    from serving.webapp import app as webapp_module
    from serving.webapp.app import HttpError

    monkeypatch.delenv("EMASSIST_MONITORING_DB_URI", raising=False)
    monkeypatch.setattr(webapp_module, "KEEP_UPLOADS", 1)
    app = _logged_app(tmp_path)
    try:
        first = app.classify(_png(40), "a.png")
        second = app.classify(_png(44), "b.png")  # only the newest upload's bytes are kept now
        cases = [
            ({"id": "nope", "label": "A"}, 404, "no classified image with id 'nope'"),
            ({"id": second["id"], "label": "Z"}, 400, "unknown class 'Z' (the model knows: A, B, C, D)"),
            ({"id": second["id"]}, 400, "label: the right class is missing"),
            (["not", "an", "object"], 400, 'send JSON {"id"'),
            ({"id": first["id"], "label": "A"}, 410, "a.png: its bytes are no longer kept (only the last 1 uploads"),
        ]
        for body, status, message in cases:
            with pytest.raises(HttpError) as err:
                app.correct(body)
            assert (err.value.status, message in err.value.message) == (status, True), err.value.message
        assert len(app.store.corrections()) == 0 and not (tmp_path / "feedback").exists()
        assert app.correct({"id": second["id"], "label": "A"})["status"] == "stored"
    finally:
        app.close_log()


def test_the_page_answers_when_the_log_store_is_down(tmp_path: Any, monkeypatch: Any) -> None:
    from serving.webapp.app import HttpError

    monkeypatch.delenv("EMASSIST_MONITORING_DB_URI", raising=False)
    missing = tmp_path / "no" / "such" / "folder" / "log.db"  # SQLite cannot create it: every write fails
    app = _logged_app(tmp_path, f"sqlite:///{missing}")
    try:
        out = app.classify(_png(40), "a.png")
        assert out["label"] == "B"  # answered
        writer = app.log_writer
        assert writer is not None and _until(lambda: writer.stats["failed_writes"] >= 1)
        assert writer.pending == 1 and writer.stats["written"] == 0  # kept for a retry
        with pytest.raises(HttpError) as err:
            app.correct({"id": out["id"], "label": "C"})
        assert err.value.status == 503 and "could not be stored" in err.value.message
        assert not list((tmp_path / "feedback").rglob("*.png"))  # no file without its row
    finally:
        app.close_log()
    off = _logged_app(tmp_path, "nosuchdialect://x")
    try:
        assert off.classify(_png(40), "b.png")["label"] == "B" and off.log_writer is None
        with pytest.raises(HttpError) as err:
            off.correct({"id": next(iter(off.results)), "label": "C"})
        assert err.value.status == 503 and "corrections are off" in err.value.message
    finally:
        off.close_log()
