"""The scale-aware model behind the pyfunc, in-process: the pixel size from the file's TIFF tags (or data bar) or the
request's ``pixel_size_nm``, scaled to the model input exactly; bad sizes refused naming the row; a model without the
scale input answering exactly as before."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.code.test_training import CLASSES, tiny_params

pytest.importorskip("keras")

FEI = "[System]\nSystemType=Quanta 250 FEG\n[Beam]\nHV=20000\n[Scan]\nPixelWidth={m}\n"


def _fei_tiff(gray: np.ndarray, nm: float) -> bytes:
    from PIL import TiffImagePlugin

    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[34682] = FEI.format(m=f"{nm * 1e-9:.6e}")
    ifd.tagtype[34682] = 2  # ASCII
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="TIFF", tiffinfo=ifd)
    return buf.getvalue()


@pytest.fixture(scope="module")
def scale_model(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A tiny untrained scale-aware compact_cnn behind the pyfunc, in-process."""
    from emassist.model.builders import build_model
    from emassist.model.registry import serving_config
    from emassist.model.saving import save_serving_copy
    from emassist.serve.pyfunc import SemClassifier

    tmp = tmp_path_factory.mktemp("scale_model")
    path = save_serving_copy(build_model("compact_cnn", num_classes=3, image_size=32, scale_input=True),
                             tmp / "model.keras")  # fmt: skip
    params = tiny_params(model="compact_cnn", scale_input=True)
    return SemClassifier.from_files(path, serving_config(params, model_file=path))


def test_the_pyfunc_reads_the_file_s_pixel_size_and_scales_it_to_the_model_input(scale_model: object) -> None:
    from tests.helpers import b64, texture

    model = scale_model
    assert model.scale_aware and model.config["scale_input"] is True  # type: ignore[attr-defined]
    big = texture(256, 512, seed=3)
    small = np.asarray(Image.fromarray(big).resize((256, 128), Image.Resampling.BOX))
    request = pd.DataFrame({"image": [b64(_fei_tiff(big, 2.0)), b64(_fei_tiff(small, 4.0)),
                                      b64(_fei_tiff(big, 2.0))]})  # fmt: skip
    answer = model.predict(None, request)  # type: ignore[attr-defined]
    assert list(answer["pixel_size_source"]) == ["tags", "tags", "tags"]
    assert list(answer["pixel_size_nm"]) == pytest.approx([2.0, 4.0, 2.0])
    # the same field of view at two file sizes: the same model-input pixel size, exactly (512 * 2 / 32 = 32 nm)
    assert list(answer["model_pixel_size_nm"]) == pytest.approx([32.0, 32.0, 32.0], rel=1e-9)
    # the caller's pixel size wins over the tags, and changes the answer
    told = model.predict(None, request.assign(pixel_size_nm=[200.0, 400.0, 2.0]))  # type: ignore[attr-defined]
    assert list(told["pixel_size_source"]) == ["request"] * 3
    assert list(told["model_pixel_size_nm"]) == pytest.approx([3200.0, 3200.0, 32.0])
    probs = list(model.classes)  # type: ignore[attr-defined]
    assert not np.allclose(told[probs].iloc[0], answer[probs].iloc[0])
    np.testing.assert_allclose(told[probs].iloc[2], answer[probs].iloc[2], atol=1e-6)
    # a PNG without tags or bar: unknown, answered all the same
    plain = model.predict(None, pd.DataFrame({"image": [b64(_png(big))]}))  # type: ignore[attr-defined]
    assert plain["pixel_size_source"].iloc[0] == "unknown" and plain["model_pixel_size_nm"].iloc[0] is None
    assert plain["label"].iloc[0] in CLASSES and plain["error"].iloc[0] == ""


def _png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), 5e7, None])
def test_a_bad_pixel_size_is_refused_naming_the_row(scale_model: object, bad: object) -> None:
    from emassist.serve.pyfunc import BadRequest
    from tests.helpers import b64, texture

    image = b64(_png(texture(64, 64, seed=1)))
    request = pd.DataFrame({"image": [image, image], "pixel_size_nm": [3.0, bad]})
    with pytest.raises(BadRequest, match=r"pixel_size_nm.*row 1: ") as info:
        scale_model.predict(None, request)  # type: ignore[attr-defined]
    assert "row 0" not in info.value.message and info.value.get_http_status_code() == 400


def test_a_model_without_the_scale_input_answers_as_before(tmp_path: Path) -> None:
    from emassist.model.builders import build_model
    from emassist.model.registry import serving_config
    from emassist.model.saving import save_serving_copy
    from emassist.serve.pyfunc import SCALE_COLUMNS, SemClassifier
    from tests.helpers import b64, texture

    path = save_serving_copy(build_model("compact_cnn", num_classes=3, image_size=32), tmp_path / "model.keras")
    config = serving_config(tiny_params(model="compact_cnn"), model_file=path)
    old = {k: v for k, v in config.items() if k != "scale_input"}  # a config registered before the key existed
    model = SemClassifier.from_files(path, old)
    assert not model.scale_aware
    request = pd.DataFrame({"image": [b64(_fei_tiff(texture(64, 64, seed=2), 2.0))]})
    answer = model.predict(None, request)
    assert not set(SCALE_COLUMNS) & set(answer.columns)
    # a pixel-size column (even a bad one) changes nothing for it
    again = model.predict(None, request.assign(pixel_size_nm=[-5.0]))
    pd.testing.assert_frame_equal(answer, again)
