"""The served model end to end, with real processes on 127.0.0.1.

One module-scoped ``mlflow server`` (sqlite + proxied artifacts in a temp dir), a tiny Keras model logged into a
run through it and registered with ``emassist.model.registry.log_and_register``, then ``mlflow models serve`` of
``models:/<name>@champion``. Requests carry real PNG, JPEG, 16-bit TIFF and BMP files made with PIL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("mlflow")
pytest.importorskip("keras")

pytestmark = pytest.mark.slow

from emassist.data.preprocess import Preprocessor  # noqa: E402
from emassist.model.registry import serving_config  # noqa: E402
from emassist.serve.pyfunc import TRUST_COLUMNS  # noqa: E402
from tests.helpers import BRIGHTNESS_CLASSES as CLASSES  # noqa: E402
from tests.helpers import b64, brightness_model, image_bytes, png_header_only  # noqa: E402
from tests.servers import mlflow_tracking_server, model_server, tracking_uri_env  # noqa: E402

MODEL_NAME = "sem-test"
#: What the evaluate stage would have fitted, written beside the model so that log_and_register ships it.
CALIBRATION = {"temperature": 2.5, "review_threshold": 0.45, "target_accuracy": 0.99, "target_reached": True}


def fit_familiarity_beside(model_file: Path, params: Any) -> Any:
    """A familiarity file for ``model_file`` (fitted on the features of mid-gray noise images, levels 70..190),
    saved as ``familiarity.npz`` beside it, as the evaluate stage does."""
    import keras

    from emassist.model.familiarity import fit_familiarity
    from emassist.model.features import with_features
    from emassist.model.files import FAMILIARITY_FILE

    pre = Preprocessor.from_params(params)
    rng = np.random.default_rng(0)
    levels = rng.integers(70, 190, 90)
    gray = np.stack([pre.resize(np.clip(lv + rng.integers(-15, 15, (48, 48)), 0, 255).astype(np.uint8))
                     for lv in levels])  # fmt: skip
    _, features = with_features(keras.models.load_model(model_file, compile=False))(
        np.asarray(pre.to_model_input(gray[..., None])), training=False
    )
    labels = np.digitize(levels, [110, 150])
    familiarity = fit_familiarity(np.asarray(features), labels, np.asarray(features), quantile=0.99)
    familiarity.save(model_file.parent / FAMILIARITY_FILE.name)
    return familiarity


def make_params(tmp: Path, tracking_uri: str, **mlflow_extra: Any) -> Any:
    from emassist.config.settings import params_from_dict

    return params_from_dict(
        {
            "data": {"classes": CLASSES, "splits_dir": str(tmp / "splits")},
            "ingest": {"cache_size": 64, "max_pixels": 4_000_000, "min_side": 16, "crop_databar": True},
            "train": {"image_size": 32},
            "mlflow": {"tracking_uri": tracking_uri, "experiment": "tests", "registered_model": MODEL_NAME},
        }
    )


def make_run(params: Any, *, f1: float | None, data_version: str = "dv-1") -> str:
    import mlflow

    from emassist.model.tracking import setup_mlflow

    setup_mlflow(params)
    with mlflow.start_run() as run:
        if f1 is not None:
            mlflow.log_metric("test_macro_f1", f1)
        mlflow.set_tags({"data_version": data_version, "git_commit": "abc123", "model": "tiny"})
    return run.info.run_id


def post(url: str, values: list[Any], column: str = "image", params: dict[str, Any] | None = None) -> Any:
    body: dict[str, Any] = {"dataframe_split": {"columns": [column], "data": [[v] for v in values]}}
    if params is not None:
        body["params"] = params
    return requests.post(f"{url}/invocations", json=body, timeout=120)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Tracking server + registered tiny model (champion) + `mlflow models serve` of it."""
    from emassist.model import registry

    tmp = tmp_path_factory.mktemp("serving")
    with mlflow_tracking_server(tmp) as tracking_uri, tracking_uri_env(tracking_uri):
        params = make_params(tmp, tracking_uri)
        model_file = brightness_model(tmp / "model.keras", conv=True)
        (tmp / "calibration.json").write_text(json.dumps(CALIBRATION))
        familiarity = fit_familiarity_beside(model_file, params)
        run_id = make_run(params, f1=0.8)
        started = time.perf_counter()
        mv = registry.log_and_register(params, run_id, model_file=model_file)
        register_s = time.perf_counter() - started
        client = registry._client()
        registry.promote(MODEL_NAME, mv.version, client=client)
        uri = f"models:/{MODEL_NAME}@champion"
        with model_server(uri, tracking_uri, tmp) as url:
            yield {
                "url": url,
                "tracking_uri": tracking_uri,
                "params": params,
                "mv": mv,
                "run_id": run_id,
                "model_uri": uri,
                "register_s": register_s,
                "tmp": tmp,
                "client": client,
                "model_file": model_file,
                "familiarity": familiarity,
            }


@pytest.fixture(scope="module")
def local_model(stack: dict[str, Any]) -> Any:
    import mlflow

    return mlflow.pyfunc.load_model(stack["model_uri"])


# --------------------------------------------------------------------------------------------- tests


def test_registered_version_has_run_tags_and_challenger_alias(stack: dict[str, Any]) -> None:
    client, mv = stack["client"], stack["mv"]
    version = client.get_model_version(MODEL_NAME, mv.version)
    assert version.run_id == stack["run_id"]
    assert float(version.tags["test_macro_f1"]) == pytest.approx(0.8)
    assert version.tags["data_version"] == "dv-1"
    assert version.tags["git_commit"] == "abc123"
    assert "challenger" in version.aliases and "champion" in version.aliases


def test_logged_model_is_self_contained(stack: dict[str, Any]) -> None:
    import mlflow

    path = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/{stack['mv'].version}"))
    # code_paths: loads where only the model is
    assert (path / "code" / "emassist" / "data" / "preprocess.py").is_file()
    config = json.loads((path / "artifacts" / "serving_config.json").read_text())
    # the preprocessor's settings exactly, the temperature and threshold fitted on val, the familiarity file
    assert config == {**serving_config(stack["params"], stack["tmp"] / "calibration.json"),
                      "familiarity": "familiarity.npz"}  # fmt: skip
    assert config["temperature"] == CALIBRATION["temperature"] and config["review_threshold"] == 0.45
    assert (path / "artifacts" / "familiarity.npz").is_file()
    assert Preprocessor.from_config(config).config() == Preprocessor.from_params(stack["params"]).config()
    assert (path / "artifacts" / "model.keras").is_file()
    reqs = (path / "requirements.txt").read_text()
    for dist in ("keras==", "pillow==", "tensorflow"):
        assert dist in reqs
    assert "emassist" not in reqs  # shipped as code, not an installable requirement
    assert not list(path.rglob("*.pkl")), "models from code: no pickled Keras model"


@pytest.mark.parametrize("kind", ["png", "jpeg", "tiff16", "bmp"])
def test_served_equals_in_process(stack: dict[str, Any], local_model: Any, kind: str) -> None:
    images = [b64(image_bytes(kind, seed=s, level=lvl)) for s, lvl in ((1, None), (2, 30), (3, 220))]
    response = post(stack["url"], images)
    assert response.status_code == 200, response.text[:500]
    served = pd.DataFrame(response.json()["predictions"])
    local = local_model.predict(pd.DataFrame({"image": images}))
    assert list(served.columns) == ["label", "confidence", *CLASSES, "error", *TRUST_COLUMNS]
    assert served["label"].tolist() == local["label"].tolist()
    assert (served["error"] == "").all()
    np.testing.assert_allclose(served[CLASSES].to_numpy(), local[CLASSES].to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served[CLASSES].sum(axis=1), 1.0, atol=1e-5)


def test_served_probabilities_are_softmax_of_log_p_over_t(stack: dict[str, Any]) -> None:
    """End to end through `mlflow models serve`: the served probabilities are softmax(log p / T) of the Keras
    model's own softmax p, with the T shipped in the serving config; confidence is their max."""
    import keras

    blobs = [image_bytes("png", seed=s, level=lv, size=(64, 64)) for s, lv in ((1, 40), (2, 128), (3, 215))]
    response = post(stack["url"], [b64(b) for b in blobs])
    assert response.status_code == 200, response.text[:500]
    served = pd.DataFrame(response.json()["predictions"])
    pre = Preprocessor.from_params(stack["params"])
    gray = np.stack([pre.standardize_file(b)[0] for b in blobs])
    raw = np.asarray(keras.models.load_model(stack["model_file"], compile=False)(
        np.asarray(pre.to_model_input(gray[..., None])), training=False), dtype=np.float64)  # fmt: skip
    logits = np.log(raw) / CALIBRATION["temperature"]
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(served[CLASSES].to_numpy(float), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(served["confidence"], expected.max(axis=1), rtol=1e-4, atol=1e-6)
    assert not np.allclose(expected, raw, atol=1e-3)  # T = 2.5 really changed them


def test_served_answers_say_when_to_review(stack: dict[str, Any]) -> None:
    """needs_review follows the shipped threshold; an image far from the training features is unfamiliar."""
    familiar = [b64(image_bytes("png", seed=s, level=lv, size=(48, 48))) for s, lv in ((4, 100), (5, 128), (6, 160))]
    # near-white: far outside the mid-gray levels the familiarity was fitted on
    strange = b64(image_bytes("png", seed=7, level=248, size=(48, 48)))
    response = post(stack["url"], [*familiar, strange])
    assert response.status_code == 200, response.text[:500]
    frame = pd.DataFrame(response.json()["predictions"])
    for row in frame.itertuples(index=False):
        assert row.unfamiliar == (row.unfamiliar_score > 1.0)
        assert row.needs_review == (row.unfamiliar or row.confidence < CALIBRATION["review_threshold"])
        assert bool(row.review_reason) == row.needs_review
    assert frame["unfamiliar_score"].iloc[:3].max() < frame["unfamiliar_score"].iloc[3]
    assert frame["unfamiliar"].iloc[3] and frame["needs_review"].iloc[3]
    assert "unfamiliar" in frame["review_reason"].iloc[3]


def test_featureless_image_is_refused_naming_the_row(stack: dict[str, Any]) -> None:
    blank = b64(png_of(np.zeros((96, 128), dtype=np.uint8)))
    alone = post(stack["url"], [blank])
    _assert_clean_error(alone, "featureless image")
    assert "row 0" in alone.json()["message"]
    mixed = post(stack["url"], [b64(image_bytes("png", seed=8)), blank])
    assert mixed.status_code == 200, mixed.text[:300]
    frame = pd.DataFrame(mixed.json()["predictions"])
    assert frame.loc[0, "error"] == "" and frame.loc[0, "label"] in CLASSES
    assert frame.loc[1, "error"].startswith("featureless image") and frame.loc[1, "label"] == ""


def test_hundred_images_in_one_request(stack: dict[str, Any]) -> None:
    images = [b64(image_bytes("png", seed=s, size=(64, 64))) for s in range(100)]
    response = post(stack["url"], images)  # a hung server fails on post()'s request timeout, not a timing assert
    assert response.status_code == 200, response.text[:500]
    predictions = response.json()["predictions"]
    assert len(predictions) == 100
    assert all(p["error"] == "" and p["label"] in CLASSES for p in predictions)


BAD_INPUTS = {
    "not_base64": ("this is *not* base64!", "not valid base64"),
    "base64_of_text": (b64(b"hello, I am a text file, not an image\n" * 3), "content is text"),
    "empty_string": ("", "empty image string"),
    "one_pixel": (b64(image_bytes("png", size=(1, 1))), "too small"),
    "over_max_pixels": (b64(png_header_only(3000, 3000)), "max_pixels"),
    "bomb_header": (b64(png_header_only(100_000, 100_000)), "decompression bomb"),
    "truncated_png": (b64(image_bytes("png")[:60]), "PNG"),
    "number": (12345, "expected a base64 string"),
}


def _assert_clean_error(response: Any, expected: str) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert expected in body["message"], body["message"]
    text = response.text
    assert "Traceback" not in text and "stack_trace" not in text and 'File "' not in text
    assert "Failed to predict data" not in text  # no echo of the input
    assert len(text) < 2000


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_image_is_a_clean_4xx_and_server_keeps_answering(stack: dict[str, Any], case: str) -> None:
    value, expected = BAD_INPUTS[case]
    response = post(stack["url"], [value])
    _assert_clean_error(response, expected)
    assert "row 0" in response.json()["message"]
    assert requests.get(f"{stack['url']}/ping", timeout=10).status_code == 200
    good = post(stack["url"], [b64(image_bytes("png"))])
    assert good.status_code == 200 and good.json()["predictions"][0]["error"] == ""


def test_missing_image_column_is_a_clean_4xx(stack: dict[str, Any]) -> None:
    response = post(stack["url"], [b64(image_bytes("png"))], column="img")
    _assert_clean_error(response, "no column 'image'")
    assert post(stack["url"], [b64(image_bytes("png"))]).status_code == 200


def test_empty_request_is_a_clean_4xx(stack: dict[str, Any]) -> None:
    response = post(stack["url"], [])
    _assert_clean_error(response, "no rows")


def test_all_bad_rows_are_listed(stack: dict[str, Any]) -> None:
    response = post(stack["url"], ["", "@@@"])
    _assert_clean_error(response, "all 2 images rejected")
    message = response.json()["message"]
    assert "row 0: empty image string" in message and "row 1: not valid base64" in message


def test_mixed_batch_marks_bad_rows(stack: dict[str, Any]) -> None:
    good = b64(image_bytes("png", seed=5))
    response = post(stack["url"], [good, "", b64(image_bytes("png", size=(1, 1))), good])
    assert response.status_code == 200, response.text[:300]
    frame = pd.DataFrame(response.json()["predictions"])
    assert frame["error"].tolist()[0] == "" and frame["error"].tolist()[3] == ""
    assert frame.loc[1, "error"] == "empty image string" and frame.loc[1, "label"] == ""
    assert "too small" in frame.loc[2, "error"] and frame.loc[2, CLASSES].sum() == 0.0
    assert frame.loc[0, "label"] in CLASSES and frame.loc[0, "label"] == frame.loc[3, "label"]


def test_data_uri_and_wrapped_base64_are_accepted(stack: dict[str, Any]) -> None:
    raw = b64(image_bytes("png", seed=7))
    wrapped = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))
    response = post(stack["url"], [f"data:image/png;base64,{raw}", wrapped])
    assert response.status_code == 200, response.text[:300]
    frame = pd.DataFrame(response.json()["predictions"])
    np.testing.assert_allclose(frame.loc[0, CLASSES].to_numpy(float), frame.loc[1, CLASSES].to_numpy(float))


def test_http_client(stack: dict[str, Any], tmp_path: Path) -> None:
    from emassist.serve.client import SemClient, ServingError, main

    (tmp_path / "a.png").write_bytes(image_bytes("png", seed=1))
    (tmp_path / "b.tif").write_bytes(image_bytes("tiff16", seed=2))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "notes.txt").write_text("not an image")
    files = sorted(tmp_path.iterdir())
    with SemClient(stack["url"]) as client:
        assert client.ping()
        frame = client.predict_files(files, batch_size=2)
        assert frame["path"].tolist() == [str(f) for f in files]
        by_name = {Path(p).name: e for p, e in zip(frame["path"], frame["error"], strict=True)}
        assert by_name["a.png"] == "" and by_name["b.tif"] == ""
        assert by_name["broken.png"] and "content is text" in by_name["notes.txt"]
        with pytest.raises(ServingError) as info:
            client.predict_base64([""])
        assert info.value.status == 400 and "empty image string" in info.value.message
    assert main(["--url", stack["url"], str(files[0])]) == 0


def test_predict_paths_with_registered_model(stack: dict[str, Any], local_model: Any, tmp_path: Path) -> None:
    from emassist.serve.predict import predict_paths

    (tmp_path / "sub").mkdir()
    data = image_bytes("jpeg", seed=9)
    (tmp_path / "sub" / "x.jpg").write_bytes(data)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    frame = predict_paths([str(tmp_path)], local_model, out=tmp_path / "out" / "p.csv", progress=False)
    assert len(frame) == 2 and (tmp_path / "out" / "p.csv").is_file()
    row = frame[frame["path"].str.endswith("x.jpg")].iloc[0]
    served = post(stack["url"], [b64(data)]).json()["predictions"][0]
    assert row["label"] == served["label"]
    np.testing.assert_allclose([row[c] for c in CLASSES], [served[c] for c in CLASSES], rtol=1e-5, atol=1e-6)
    assert frame[frame["path"].str.endswith("bad.png")]["error"].iloc[0]


# --------------------------------------------------------------------------------------------- standardized images


def barred_image(seed: int = 0, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """uint8 gray noise with a dark data bar (text-like marks) over the bottom 12 rows."""
    h, w = size
    gray = np.random.default_rng(seed).normal(150, 40, (h, w)).clip(0, 255).astype(np.uint8)
    gray[-12:] = 0
    gray[-8:-5, 8 : w // 2 : 3] = 255
    return gray


def png_of(gray: np.ndarray) -> bytes:
    from emassist.serve.drawing import png_bytes

    return png_bytes(gray)


def test_standardized_param_skips_the_databar_search(stack: dict[str, Any], local_model: Any) -> None:
    gray = barred_image(1)
    pre = Preprocessor.from_params(stack["params"])
    assert pre.standardize(gray)[1] > 0  # a data bar the plain path crops
    value = b64(png_of(gray))
    classifier = local_model.unwrap_python_model()
    as_tile = post(stack["url"], [value], params={"standardized": True})
    as_file = post(stack["url"], [value], params={"standardized": False})
    plain = post(stack["url"], [value])
    assert as_tile.status_code == as_file.status_code == plain.status_code == 200, as_tile.text[:300]
    tile_p = pd.DataFrame(as_tile.json()["predictions"])[CLASSES].to_numpy()
    file_p = pd.DataFrame(as_file.json()["predictions"])[CLASSES].to_numpy()
    np.testing.assert_allclose(tile_p, classifier.probabilities(pre.resize(gray)[None]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(file_p, classifier.probabilities(pre.standardize(gray)[0][None]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(file_p, pd.DataFrame(plain.json()["predictions"])[CLASSES].to_numpy())
    assert not np.allclose(tile_p, file_p)


@pytest.mark.parametrize("bad", ["yes", 1, [True]])
def test_standardized_param_of_the_wrong_type_is_a_400(stack: dict[str, Any], bad: Any) -> None:
    response = post(stack["url"], [b64(image_bytes("png"))], params={"standardized": bad})
    assert response.status_code == 400, (response.status_code, response.text[:300])
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "standardized" in body["message"] and "boolean" in body["message"], body["message"][:500]
    assert "Traceback" not in response.text and "stack_trace" not in response.text
    assert requests.get(f"{stack['url']}/ping", timeout=10).status_code == 200
    assert post(stack["url"], [b64(image_bytes("png"))], params={"standardized": True}).status_code == 200


def test_tile_scan_through_the_endpoint_equals_the_local_scan(stack: dict[str, Any], tmp_path: Path) -> None:
    """The page's endpoint backend: the served version's registered preprocessing (not the page's params), the
    overview's data bar cropped once here, tiles sent as standardized PNGs; the same scores as in-process."""
    from emassist.config.settings import params_from_dict
    from emassist.serve import tilescan
    from emassist.serve.backend import load_endpoint, load_registry

    registered = Preprocessor.from_params(stack["params"])
    page = params_from_dict(  # a page whose own params disagree with the served model's settings
        {
            "data": {"classes": CLASSES[:2], "splits_dir": str(tmp_path / "splits")},
            "ingest": {"cache_size": 48, "crop_databar": False, "max_pixels": 10_000, "min_side": 32},
            "train": {"image_size": 32},
            "mlflow": {"tracking_uri": stack["tracking_uri"], "registered_model": MODEL_NAME},
            "webapp": {"endpoint_url": stack["url"]},
        }
    )
    endpoint = load_endpoint(page)
    local = load_registry(page)
    assert endpoint.preprocessor == local.preprocessor == registered
    assert endpoint.classes == local.classes == CLASSES
    assert endpoint.info.version == str(stack["mv"].version) and endpoint.info.source == "endpoint"

    gray = barred_image(2, (200, 300))
    gray[:-12, 150:] = (gray[:-12, 150:] * 0.3).astype(np.uint8)  # a darker right half: scores differ by tile
    options = {"tile": 64, "stride": 48, "batch_size": 5}
    via_endpoint = tilescan.scan(gray, endpoint.probabilities, endpoint.classes, preprocessor=endpoint.preprocessor,
                                 **options)  # fmt: skip
    in_process = tilescan.scan(gray, local.probabilities, local.classes, preprocessor=local.preprocessor, **options)
    assert via_endpoint.databar_rows == in_process.databar_rows == registered.crop(gray)[1] > 0
    assert (via_endpoint.xs, via_endpoint.ys) == (in_process.xs, in_process.ys) and via_endpoint.n_tiles > 8
    np.testing.assert_allclose(via_endpoint.scores, in_process.scores, rtol=1e-5, atol=1e-6)
    assert float(np.ptp(in_process.scores[..., 0])) > 1e-3  # the grid is not flat: the comparison means something
    # A whole uploaded file goes as it is (the server crops its data bar) and agrees with the local path too.
    data = png_of(gray)
    local_gray = local.preprocessor.standardize_file(data)[0]
    remote, here = endpoint.classify_file(data, local_gray), local.classify_file(data, local_gray)
    np.testing.assert_allclose(remote.proba, here.proba, rtol=1e-5, atol=1e-6)
    assert remote.unfamiliar == here.unfamiliar is not None  # both know the model ships the familiarity check
    assert remote.unfamiliar_score == pytest.approx(here.unfamiliar_score, rel=1e-4)
