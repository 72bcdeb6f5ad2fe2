"""A scale-aware model behind a real ``mlflow models serve`` process (issue 15 part 2).

The serving pyfunc of a tiny scale-aware compact_cnn saved as a local MLflow model folder (with the signature and
serving config registration writes), served on 127.0.0.1. Requests with and without ``pixel_size_nm``: the size from
the file's own TIFF tags (the same field of view at two file sizes gets the same model-input pixel size), the
caller's size winning, a PNG without tags answered as unknown; bad sizes (negative, zero, null/NaN, absurd) are
HTTP 400 naming the row, and the server keeps answering. A model WITHOUT the scale input is tests/system/
test_serving.py (unchanged) and tests/code/test_scale_serving.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

requests = pytest.importorskip("requests")
pytest.importorskip("mlflow")
pytest.importorskip("keras")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*An input example was not provided")]

from tests.code.test_scale_serving import _fei_tiff, _png  # noqa: E402
from tests.helpers import b64, texture  # noqa: E402
from tests.servers import model_server  # noqa: E402

CLASSES = ["Fibres", "Nanowires", "Particles"]
IMAGE_SIZE = 32


def save_scale_pyfunc(folder: Path, tmp: Path) -> Path:
    """The serving pyfunc of an untrained scale-aware compact_cnn, as registration would log it."""
    import mlflow

    import emassist
    from emassist.config.settings import params_from_dict
    from emassist.model.builders import build_model
    from emassist.model.registry import model_signature, pip_requirements, pyfunc_code_path, serving_config
    from emassist.model.saving import save_serving_copy

    params = params_from_dict({"data": {"classes": CLASSES},
                               "train": {"model": "compact_cnn", "image_size": IMAGE_SIZE, "scale_input": True},
                               "ingest": {"cache_size": 64, "max_pixels": 4_000_000, "min_side": 16}})  # fmt: skip
    model_file = save_serving_copy(
        build_model("compact_cnn", num_classes=len(CLASSES), image_size=IMAGE_SIZE, scale_input=True, seed=3),
        tmp / "model.keras",
    )
    config = serving_config(params, model_file=model_file)
    assert config["scale_input"] is True
    config_file = tmp / "serving_config.json"
    config_file.write_text(json.dumps(config))
    package = tmp / "code" / "emassist"
    shutil.copytree(Path(emassist.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(pyfunc_code_path()),
        artifacts={"keras_model": str(model_file), "config": str(config_file)},
        code_paths=[str(package)],
        signature=model_signature(CLASSES, scale_input=True),
        pip_requirements=pip_requirements(),
    )
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serving_scale")
    model_dir = save_scale_pyfunc(tmp / "model", tmp)
    with model_server(str(model_dir), f"sqlite:///{tmp / 'mlflow.db'}", tmp) as url:
        yield url


def post(url: str, images: list[str], sizes: list[Any] | None = None) -> Any:
    columns = ["image"] if sizes is None else ["image", "pixel_size_nm"]
    rows = [[v] for v in images] if sizes is None else [[v, s] for v, s in zip(images, sizes, strict=True)]
    return requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": columns, "data": rows}},
                         timeout=120)  # fmt: skip


def _not_json(constant: str) -> float:
    raise AssertionError(f"the answer holds {constant}, which is not JSON (a browser's JSON.parse refuses it)")


def answers(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text[:500]
    return json.loads(response.text, parse_constant=_not_json)["predictions"]  # strict: NaN / Infinity fail


def test_pixel_size_with_and_without_the_column(server: str) -> None:
    big = texture(256, 512, seed=5)
    small = np.asarray(Image.fromarray(big).resize((256, 128), Image.Resampling.BOX))
    files = [b64(_fei_tiff(big, 2.0)), b64(_fei_tiff(small, 4.0)), b64(_png(big))]
    # without the column: the files' own tags (the same field of view at two sizes: the same model input), or unknown
    read = answers(post(server, files))
    assert [r["pixel_size_source"] for r in read] == ["tags", "tags", "unknown"]
    assert [r["pixel_size_nm"] for r in read[:2]] == pytest.approx([2.0, 4.0])
    assert [r["model_pixel_size_nm"] for r in read[:2]] == pytest.approx([512 * 2.0 / IMAGE_SIZE] * 2, rel=1e-9)
    assert read[2]["pixel_size_nm"] is None and read[2]["model_pixel_size_nm"] is None  # JSON null, not NaN
    assert read[2]["label"] in CLASSES
    # with it: the caller's size wins (tags or not) and reaches the model
    told = answers(post(server, files, [2.0, 40.0, 2.0]))
    assert [r["pixel_size_source"] for r in told] == ["request"] * 3
    assert [r["model_pixel_size_nm"] for r in told] == pytest.approx([32.0, 320.0, 32.0])
    probabilities = [[r[c] for c in CLASSES] for r in (read[0], told[0], told[1], told[2])]
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-6)  # the tags' size, sent explicitly
    assert not np.allclose(probabilities[1], probabilities[2])  # ten times the size: another answer
    np.testing.assert_allclose(probabilities[3], probabilities[1], atol=1e-6)  # the PNG, now at the TIFF's size


@pytest.mark.parametrize("bad", [-3.0, 0.0, None, 1e9])
def test_a_bad_pixel_size_is_a_400_naming_the_row_and_the_server_stays_up(server: str, bad: Any) -> None:
    image = b64(_png(texture(64, 64, seed=2)))
    response = post(server, [image, image, image], [2.0, 2.0, bad])
    assert response.status_code == 400, response.text[:300]
    message = response.json()["message"]
    assert "pixel_size_nm" in message and "row 2:" in message and "row 0" not in message, message
    assert len(message) < 300 and image[:40] not in message  # short: no echo of the request
    assert requests.get(f"{server}/ping", timeout=10).status_code == 200
    assert answers(post(server, [image], [2.0]))[0]["pixel_size_source"] == "request"
