"""A scale-aware model on the web page's paths (issue 15 part 2): Grad-CAM with the scale input (compact_cnn and the
nested xception), the tile scan giving each tile the full image's pixel size scaled to the tile's model input, the
page's answer, scan and CSV saying which pixel size was used and where it came from, and an endpoint getting the
tiles' sizes as the ``pixel_size_nm`` of the PNGs it is sent. A model without the scale input shows none."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from emassist.config.settings import params_from_dict
from emassist.data.preprocess import Preprocessor
from emassist.model.scale import ScaleUsed, scale_features
from tests.code.test_scale_serving import _fei_tiff
from tests.helpers import texture

pytest.importorskip("keras")

CLASSES = ["Fibres", "Nanowires", "Particles"]


def _classifier(tmp: Path, name: str = "compact_cnn", size: int = 32, *, scale_input: bool = True) -> Any:
    from emassist.model.builders import build_model
    from emassist.model.registry import serving_config
    from emassist.model.saving import save_serving_copy
    from emassist.serve.pyfunc import SemClassifier

    path = save_serving_copy(
        build_model(name, num_classes=len(CLASSES), image_size=size, scale_input=scale_input, seed=5),
        tmp / f"{name}-{scale_input}.keras",
    )
    ingest = {"cache_size": max(64, size), "max_pixels": 4_000_000, "min_side": 16}
    params = params_from_dict({"data": {"classes": CLASSES}, "train": {"model": name, "image_size": size},
                               "ingest": ingest})  # fmt: skip
    return SemClassifier.from_files(path, serving_config(params, model_file=path))


def _local(model: Any) -> Any:
    from emassist.serve.backend import LocalBackend, ModelInfo

    return LocalBackend(model, ModelInfo("m", "3", "champion", "registry", "models:/m/3"))


@pytest.fixture(scope="module")
def scale_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _classifier(tmp_path_factory.mktemp("scale_webapp"))


@pytest.mark.parametrize(("name", "size"), [("compact_cnn", 32), ("xception", 71)])
def test_grad_cam_takes_the_scale_input(name: str, size: int, tmp_path: Path) -> None:
    from emassist.serve.gradcam import GradCam

    model = _classifier(tmp_path, name, size)
    cam = GradCam(model.model, size)
    gray = texture(64, 64, seed=4)
    for nm in (1.0, 1e4):
        scale = scale_features([nm])
        heat, k = cam(gray, None, scale)
        assert heat.shape == gray.shape and 0.0 <= heat.min() <= heat.max() <= 1.0
        # the class explained is the one the model predicts with this pixel size
        assert k == int(np.argmax(model.probabilities(gray[None], scale)[0]))
    heat_a, _ = cam(gray, 1, scale_features([1.0]))
    heat_b, _ = cam(gray, 1, scale_features([1e4]))
    np.testing.assert_allclose(heat_a, heat_b, atol=1e-4)  # a given class's map: the scale joins after the convs
    assert cam(gray, 0)[0].shape == gray.shape  # no scale given: unknown


def test_each_tile_gets_the_full_image_s_pixel_size_scaled_to_its_model_input() -> None:
    from emassist.serve import tilescan

    pre = Preprocessor(cache_size=64, crop_databar=True, max_pixels=10**7, min_side=16, image_size=32)
    seen: list[np.ndarray] = []

    def predict(tiles: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        assert scale is not None and scale.shape == (len(tiles), 2)
        seen.append(scale)
        return np.tile([0.2, 0.3, 0.5], (len(tiles), 1))

    gray = texture(300, 400, seed=1)
    result = tilescan.scan(gray, predict, CLASSES, tile=128, stride=128, preprocessor=pre,
                           scale=ScaleUsed.of(2.5, "tags", 400, 32))  # fmt: skip
    # 2.5 nm pixels, a 128-px tile squashed to 32: 10 nm at the model input, for every tile
    assert result.tile_pixel_size_nm == pytest.approx(10.0) and result.pixel_size_nm == 2.5
    assert result.pixel_size_source == "tags"
    np.testing.assert_allclose(np.concatenate(seen), np.tile([[1.0, 1.0]], (result.n_tiles, 1)), atol=1e-6)
    seen.clear()
    unknown = tilescan.scan(gray, predict, CLASSES, tile=128, stride=128, preprocessor=pre,
                            scale=ScaleUsed.unknown("no bar"))  # fmt: skip
    assert unknown.pixel_size_source == "unknown" and unknown.tile_pixel_size_nm is None
    assert (np.concatenate(seen) == 0).all()
    plain = tilescan.scan(gray, lambda t: np.tile([0.2, 0.3, 0.5], (len(t), 1)), CLASSES, tile=128, stride=128,
                          preprocessor=pre)  # fmt: skip
    assert plain.pixel_size_source == "" and plain.n_tiles == result.n_tiles  # no scale input: as before


def test_the_page_shows_the_pixel_size_used_and_where_it_came_from(scale_model: Any, tmp_path: Path) -> None:
    from serving.webapp.app import SCALE_CSV_COLUMNS, WebApp

    app = WebApp(params_from_dict({"data": {"classes": CLASSES}}), _local(scale_model))
    assert app.info()["scale_input"] is True
    tiff = _fei_tiff(texture(200, 320, seed=6), 4.0)
    out = app.classify(tiff, "fei.tif")
    used = out["pixel_size"]
    assert used["pixel_size_source"] == "tags" and used["pixel_size_nm"] == pytest.approx(4.0)
    assert used["model_pixel_size_nm"] == pytest.approx(4.0 * 320 / 32)
    # the same answer as the pyfunc gives the same file
    import base64

    served = scale_model.predict(None, pd.DataFrame({"image": [base64.b64encode(tiff).decode()]}))
    assert out["label"] == served["label"].iloc[0]
    assert out["probabilities"][CLASSES[0]] == pytest.approx(float(served[CLASSES[0]].iloc[0]), abs=1e-5)
    assert app.gradcam(out["id"], None)["class"] in CLASSES
    png_out = app.classify(_png(texture(100, 100, seed=2)), "plain.png")
    assert png_out["pixel_size"]["pixel_size_source"] == "unknown" and png_out["pixel_size"]["reason"]
    header, *rows = app.results_csv(None).strip().splitlines()
    assert header.split(",")[-3:] == list(SCALE_CSV_COLUMNS)
    assert rows[0].split(",")[-3:] == ["4", "40", "tags"] and rows[1].split(",")[-1] == "unknown"
    scan = app.scan(_fei_tiff(texture(256, 512, seed=3), 2.0), "big.tif", CLASSES[0], 128, 128)
    assert scan["pixel_size"] == {"pixel_size_nm": 2.0, "model_pixel_size_nm": pytest.approx(8.0),
                                  "pixel_size_source": "tags"}  # fmt: skip


def _png(gray: np.ndarray) -> bytes:
    from emassist.serve.drawing import png_bytes

    return png_bytes(gray)


def test_a_model_without_the_scale_input_shows_no_pixel_size(tmp_path: Path) -> None:
    from serving.webapp.app import WebApp

    app = WebApp(params_from_dict({"data": {"classes": CLASSES}}), _local(_classifier(tmp_path, scale_input=False)))
    assert app.info()["scale_input"] is False
    out = app.classify(_fei_tiff(texture(200, 320, seed=6), 4.0), "fei.tif")
    assert out["pixel_size"] is None and "pixel_size" not in app.results_csv(None).splitlines()[0]
    assert app.scan(_fei_tiff(texture(256, 512, seed=3), 2.0), "big.tif", CLASSES[0], 128, 128)["pixel_size"] is None


def test_an_endpoint_gets_the_tiles_pixel_size_as_that_of_the_png_sent() -> None:
    from emassist.serve.backend import EndpointBackend

    sent: dict[str, Any] = {}

    class Client:
        def predict_bytes(self, blobs: list[bytes], *, standardized: bool, pixel_sizes: Any = None) -> pd.DataFrame:
            sent.update(n=len(blobs), standardized=standardized, pixel_sizes=pixel_sizes)
            return pd.DataFrame({c: [1 / 3] * len(blobs) for c in CLASSES})

    backend = EndpointBackend.__new__(EndpointBackend)
    backend.url, backend.client, backend.classes = "http://x", Client(), CLASSES  # type: ignore[assignment]
    backend.config = {"scale_input": True, "classes": CLASSES}
    backend.preprocessor = Preprocessor(cache_size=64, crop_databar=True, max_pixels=10**7, min_side=16, image_size=32)
    tiles = np.stack([texture(64, 64, seed=i) for i in range(3)])
    backend.probabilities(tiles, scale_features([10.0] * 3))
    # 10 nm at the 32-px model input = 5 nm per pixel of the 64-px PNG (the server multiplies by 64 / 32)
    assert sent["standardized"] and sent["pixel_sizes"] == pytest.approx([5.0] * 3)
    backend.probabilities(tiles, scale_features([10.0, None, 10.0]))
    assert sent["pixel_sizes"] is None  # a size unknown: none sent (the server's answer for unknown)
    assert math.isclose(backend.probabilities(tiles).sum(), 3.0)
