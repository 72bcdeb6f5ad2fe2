"""Featureless frames through the serving path of a small trained model (the session's ``small_model``).

A blank row of a batch gets that row's ``error`` (and no label) while the other rows are scored; a one-image request
of a blank frame is a bad request naming the row (HTTP 400 from ``mlflow models serve``); a model registered before
the check (no ``min_contrast`` in its serving config) refuses it too. Tiles are never checked: a tile scan over an
overview with a flat region scores every tile, and so does the ``standardized`` path; only a featureless overview
as a whole is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from emassist.data.decode import ImageRejected
from emassist.data.preprocess import DEFAULT_MIN_CONTRAST, STANDARDIZED_PARAM
from emassist.serve import tilescan
from tests.helpers import SmallModel, b64, demo_image, encode, with_databar

pytest.importorskip("keras")

SEED = 4321  # demo seed of the test images: not the training images'
FEATURELESS = "featureless image: gray levels vary by 0.00 (std)"


def _frame(files: list[bytes]) -> pd.DataFrame:
    return pd.DataFrame({"image": [b64(f) for f in files]})


@pytest.fixture(scope="module")
def classifier(small_model: SmallModel) -> Any:
    return small_model.classifier()


def test_a_blank_row_is_refused_and_the_others_are_scored(classifier: Any, small_model: SmallModel) -> None:
    assert classifier.preprocessor.min_contrast == DEFAULT_MIN_CONTRAST  # from the serving config
    bar_only, _ = with_databar(np.full((120, 128), 25, np.uint8))
    files = [
        encode(demo_image(small_model.classes[0], 0, 128, SEED), "PNG"),
        encode(np.zeros((96, 128), np.uint8), "PNG"),  # a navigation-camera frame
        encode(demo_image(small_model.classes[1], 1, 128, SEED), "JPEG"),
        encode(bar_only, "PNG"),  # nothing but the data bar
    ]
    out = classifier.predict(None, _frame(files))
    assert len(out) == 4
    assert out.loc[[1, 3], "error"].str.startswith(FEATURELESS).all(), out["error"].tolist()
    assert (out.loc[[1, 3], "label"] == "").all() and out.loc[[1, 3], "needs_review"].all()
    assert (out.loc[[0, 2], "error"] == "").all()
    assert out.loc[[0, 2], "label"].isin(small_model.classes).all()
    np.testing.assert_allclose(out.loc[[0, 2], small_model.classes].sum(axis=1), 1.0, rtol=1e-5)


def test_a_one_image_request_of_a_blank_frame_is_a_bad_request_naming_the_row(classifier: Any) -> None:
    from emassist.serve.pyfunc import BadRequest

    with pytest.raises(BadRequest, match=r"^image rejected: row 0: featureless image: .*min_contrast=2;"):
        classifier.predict(None, _frame([encode(np.full((64, 64), 200, np.uint8), "PNG")]))


def test_a_model_registered_before_the_check_refuses_blank_frames_too(small_model: SmallModel) -> None:
    from emassist.serve.pyfunc import SemClassifier

    older = {k: v for k, v in small_model.config.items() if k != "min_contrast"}
    model = SemClassifier.from_files(small_model.model_file, older)
    assert model.preprocessor.min_contrast == DEFAULT_MIN_CONTRAST
    out = model.predict(None, _frame([encode(np.zeros((64, 64), np.uint8), "PNG"), encode(demo_image(
        small_model.classes[2], 2, 128, SEED), "PNG")]))  # fmt: skip
    assert out.loc[0, "error"].startswith(FEATURELESS) and out.loc[1, "error"] == ""


@pytest.mark.real_sem
def test_the_real_navigation_camera_frame_is_refused(classifier: Any, real_sem_dir: Path) -> None:
    navcam = (real_sem_dir / "rsciio__FEI-Helios-navcam.tif").read_bytes()
    real = (real_sem_dir / "saemi__demo_img.jpg").read_bytes()
    out = classifier.predict(None, _frame([navcam, real]))
    assert out.loc[0, "error"].startswith(FEATURELESS) and out.loc[0, "label"] == ""
    assert out.loc[1, "error"] == "" and out.loc[1, "label"] != ""


def test_tiles_are_scored_even_where_flat_and_a_blank_overview_is_refused(
    classifier: Any, small_model: SmallModel
) -> None:
    scene = demo_image(small_model.classes[1], 3, 128, SEED)
    overview = np.concatenate([scene, np.full((128, 256), int(scene.mean()), np.uint8)], axis=1)  # flat right part
    pre = classifier.preprocessor
    res = tilescan.scan(overview, classifier.probabilities, classifier.classes, tile=64, stride=64, preprocessor=pre)
    assert res.n_tiles == 2 * 6 and res.scores.shape == (2, 6, len(classifier.classes))
    np.testing.assert_allclose(res.scores.sum(axis=2), 1.0, rtol=1e-5)  # every tile scored, the flat ones too
    assert len(res.rows()) == 12 and all(r["label"] for r in res.rows())
    # A flat tile sent on its own as already standardized (what the page sends an endpoint) is scored, not refused.
    flat_tile = encode(np.full((64, 64), 90, np.uint8), "PNG")
    out = classifier.predict(None, _frame([flat_tile]), params={STANDARDIZED_PARAM: True})
    assert out.loc[0, "error"] == "" and out.loc[0, "label"] in classifier.classes
    # A featureless overview as a whole is refused before any tile reaches the model.
    calls: list[int] = []

    def counting(tiles: np.ndarray) -> np.ndarray:
        calls.append(len(tiles))
        return classifier.probabilities(tiles)

    with pytest.raises(ImageRejected, match=f"^{FEATURELESS[:19]}"):
        tilescan.scan(np.zeros((256, 384), np.uint8), counting, classifier.classes, tile=64, stride=64,
                      preprocessor=pre)  # fmt: skip
    assert calls == []
