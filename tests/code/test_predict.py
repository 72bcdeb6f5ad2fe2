"""Batch prediction (``emassist predict``) and the pyfunc model's building blocks, in-process (no servers)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.helpers import BRIGHTNESS_CLASSES as CLASSES
from tests.helpers import b64, brightness_model, image_bytes, models_cli, png_header_only

pytest.importorskip("keras")


@pytest.fixture(autouse=True)
def prediction_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`emassist predict` logs its answers (monitoring.log_predictions): to a file of this test, not the cwd's."""
    url = f"sqlite:///{tmp_path / 'monitoring.db'}"
    monkeypatch.setenv("EMASSIST_MONITORING_DB_URI", url)
    return url


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    tmp = tmp_path_factory.mktemp("predict")
    brightness_model(tmp / "model.keras", conv=True)
    (tmp / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"classes": CLASSES},
                "ingest": {"cache_size": 64, "max_pixels": 4_000_000, "min_side": 16},
                "train": {"image_size": 32},
            }
        )
    )
    return tmp


@pytest.fixture(scope="module")
def classifier(model_dir: Path) -> Any:
    from emassist.config.settings import load_params
    from emassist.model.registry import serving_config
    from emassist.serve.pyfunc import SemClassifier

    return SemClassifier.from_files(model_dir / "model.keras", serving_config(load_params(model_dir / "params.yaml")))


def _folder(root: Path) -> Path:
    images = root / "images"
    (images / "sub" / "deeper").mkdir(parents=True)
    (images / "a.png").write_bytes(image_bytes("png", seed=1, level=30))
    (images / "sub" / "b.jpg").write_bytes(image_bytes("jpeg", seed=2, level=220))
    (images / "sub" / "deeper" / "c.tif").write_bytes(image_bytes("tiff16", seed=3))
    (images / "broken.png").write_bytes(image_bytes("png", seed=4)[:80])  # truncated
    (images / "notes.txt").write_text("not an image\n")
    (images / "bomb.png").write_bytes(png_header_only(5000, 5000))
    (images / ".hidden.png").write_bytes(b"skipped")
    return images


def test_predict_cli_folder_with_corrupt_files(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _folder(tmp_path)
    out = tmp_path / "preds.csv"
    code = models_cli(
        model_dir / "params.yaml",
        "predict", str(images), "--model", str(model_dir / "model.keras"),
        "--out", str(out), "--top-k", "2", "--no-progress",
    )  # fmt: skip
    assert code == 3  # some files failed, the CSV is still written
    frame = pd.read_csv(out, keep_default_na=False)
    names = {Path(p).name: row for p, row in zip(frame["path"], frame.to_dict("records"), strict=True)}
    assert set(names) == {"a.png", "b.jpg", "c.tif", "broken.png", "notes.txt", "bomb.png"}
    for good in ("a.png", "b.jpg", "c.tif"):
        assert names[good]["error"] == "" and names[good]["label"] in CLASSES
        assert sum(names[good][c] for c in CLASSES) == pytest.approx(1.0, abs=1e-5)
    assert "truncated" in names["broken.png"]["error"] or "corrupt" in names["broken.png"]["error"]
    assert "content is text" in names["notes.txt"]["error"]
    assert "max_pixels" in names["bomb.png"]["error"]
    assert all(names[bad]["label"] == "" for bad in ("broken.png", "notes.txt", "bomb.png"))
    printed = capsys.readouterr()
    assert "ERROR" in printed.out and "a.png:" in printed.out
    assert "3 predicted, 3 failed" in printed.err
    # every answer says whether to check it: the CSV's columns, the marked lines and the count agree
    for good in ("a.png", "b.jpg", "c.tif"):
        needs = str(names[good]["needs_review"]) == "True"
        assert needs == (names[good]["confidence"] < 0.5)  # a .keras file without calibration: the legacy 0.5
        line = next(x for x in printed.out.splitlines() if x.split(":")[0].endswith(good))
        assert ("[check: confidence" in line) == needs
    n_review = sum(str(names[g]["needs_review"]) == "True" for g in ("a.png", "b.jpg", "c.tif"))
    assert f"; {n_review} to check by eye (0 unlike the training data)" in printed.err
    assert "registered without a review threshold" in printed.err and "uncalibrated" in printed.err


def test_predict_cli_globs_and_missing(model_dir: Path, tmp_path: Path) -> None:
    images = _folder(tmp_path)
    out = tmp_path / "p.csv"
    code = models_cli(
        model_dir / "params.yaml",
        "predict", str(images / "**" / "*.jpg"), str(images / "a.png"), str(tmp_path / "nope.tif"),
        "--model", str(model_dir / "model.keras"), "--out", str(out), "--top-k", "0", "--no-progress",
    )  # fmt: skip
    assert code == 3
    frame = pd.read_csv(out, keep_default_na=False)
    assert sorted(Path(p).name for p in frame["path"]) == ["a.png", "b.jpg", "nope.tif"]
    assert frame.set_index("path").loc[str(tmp_path / "nope.tif"), "error"] == "not found"


def test_predict_cli_all_good_exit_zero(model_dir: Path, tmp_path: Path, prediction_log: str) -> None:
    from emassist.data.predlog import PredictionLog

    (tmp_path / "x.png").write_bytes(image_bytes("png"))
    out = tmp_path / "p.csv"
    code = models_cli(
        model_dir / "params.yaml",
        "predict", str(tmp_path / "x.png"), "--model", str(model_dir / "model.keras"), "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert code == 0 and out.is_file()
    assert PredictionLog(prediction_log).predictions()["origin"].tolist() == [str(tmp_path / "x.png")]


def test_predict_help_is_helpful(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        models_cli(Path("params.yaml"), "predict", "--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for word in ("--model", "--out", "--top-k", "champion", "recursive", "Exit codes", "--no-log", "prediction log"):
        assert word in text


def test_expand_paths(tmp_path: Path) -> None:
    from emassist.serve.predict import expand_paths

    images = _folder(tmp_path)
    files, missing = expand_paths([images, str(images / "a.png"), str(tmp_path / "*.none")])
    names = [Path(f).name for f in files]
    assert names.count("a.png") == 1 and ".hidden.png" not in names and "c.tif" in names
    assert missing == [(str(tmp_path / "*.none"), "no file matches this pattern")]


def test_native_and_pyfunc_paths_agree(classifier: Any, tmp_path: Path) -> None:
    """predict_paths (file bytes) and the pyfunc's predict (base64 rows) give the same numbers."""
    from emassist.serve.predict import predict_paths

    blobs = [image_bytes("png", seed=1), image_bytes("jpeg", seed=2), image_bytes("tiff16", seed=3)]
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(tmp_path / f"{i}.img")
        paths[-1].write_bytes(blob)
    native = predict_paths([str(p) for p in paths], classifier, progress=False)
    rows = classifier.predict(None, pd.DataFrame({"image": [b64(b) for b in blobs]}))
    assert native["label"].tolist() == rows["label"].tolist()
    np.testing.assert_allclose(native[CLASSES].to_numpy(), rows[CLASSES].to_numpy(), rtol=1e-6)


def test_serving_matches_the_training_input_path(classifier: Any) -> None:
    """A cached PNG (cache size, no data bar) scores the same as the training/evaluation pipeline scores it."""
    import tensorflow as tf

    from emassist.data.dataset import decode_cached_png
    from emassist.data.preprocess import to_model_input

    blob = image_bytes("png", seed=11, size=(64, 64))
    served = classifier.predict(None, pd.DataFrame({"image": [b64(blob)]}))
    x = to_model_input(decode_cached_png(tf.constant(_tmp_png(blob))), 32)
    expected = classifier.model.predict(x[None], verbose=0)[0]
    np.testing.assert_allclose(served[CLASSES].to_numpy()[0], expected, rtol=1e-5, atol=1e-6)


def _tmp_png(blob: bytes) -> str:
    import tempfile

    fh = tempfile.NamedTemporaryFile(suffix=".png", delete=False)  # noqa: SIM115
    fh.write(blob)
    fh.close()
    return fh.name


# --------------------------------------------------------------------------------------------- pyfunc pieces


def test_bad_request_message_cannot_be_rewritten() -> None:
    """The scoring server sets ``e.message = f"Failed to predict data '{data}'..."``; BadRequest keeps its own."""
    from emassist.serve.pyfunc import BadRequest

    exc = BadRequest("image rejected: row 0: empty image string")
    exc.message = "Failed to predict data '<megabytes of base64>'. \nError: " + exc.message
    body = json.loads(exc.serialize_as_json())
    assert body["message"] == "image rejected: row 0: empty image string"
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and exc.get_http_status_code() == 400


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty image string"),
        ("   \n", "empty image string"),
        ("data:image/png;base64,", "empty image string"),
        ("abc$", "not valid base64"),
        ("abcde", "not valid base64"),
        (None, "expected a base64 string"),
        (3.5, "expected a base64 string"),
    ],
)
def test_decode_base64_rejects(value: Any, reason: str) -> None:
    from emassist.data.decode import ImageRejected
    from emassist.serve.pyfunc import decode_base64

    with pytest.raises(ImageRejected, match=reason):
        decode_base64(value)


def test_decode_base64_accepts_variants() -> None:
    from emassist.serve.pyfunc import decode_base64

    data = bytes(range(256)) * 3
    plain = b64(data)
    assert decode_base64(plain) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode()) == data
    assert decode_base64("data:image/tiff;base64," + plain) == data
    assert decode_base64("\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))) == data


def test_in_process_errors(classifier: Any) -> None:
    from emassist.serve.pyfunc import BadRequest

    with pytest.raises(BadRequest, match="no column 'image'"):
        classifier.predict(None, pd.DataFrame({"img": ["x"]}))
    with pytest.raises(BadRequest, match="no rows"):
        classifier.predict(None, pd.DataFrame({"image": pd.Series([], dtype=object)}))
    with pytest.raises(BadRequest, match=r"all 12 images rejected: row 0: .*; and 2 more"):
        classifier.predict(None, pd.DataFrame({"image": [""] * 12}))


def test_large_batch_is_chunked(classifier: Any) -> None:
    blobs = [b64(image_bytes("png", seed=s, size=(40, 40))) for s in range(70)]
    whole = classifier.predict(None, pd.DataFrame({"image": blobs}))
    one = classifier.predict(None, pd.DataFrame({"image": blobs[65:66]}))
    assert len(whole) == 70 and (whole["error"] == "").all()
    np.testing.assert_allclose(whole.loc[65, CLASSES].to_numpy(float), one.loc[0, CLASSES].to_numpy(float), rtol=1e-5)


def test_internal_failure_is_a_short_500(classifier: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from emassist.serve.pyfunc import BadRequest

    def broken(batch: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(classifier, "score", broken)
    blob = b64(image_bytes("png"))
    with pytest.raises(BadRequest) as info:
        classifier.predict(None, pd.DataFrame({"image": [blob]}))
    assert info.value.get_http_status_code() == 500
    assert info.value.message == "internal error while predicting: RuntimeError"


class _GenericPyfunc:
    """A pyfunc-like model with only ``predict(frame)`` (not a SemClassifier): the batch fallback path."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.inner.predict(None, frame)


def test_generic_pyfunc_fallback_agrees_and_names_each_bad_file(classifier: Any, tmp_path: Path) -> None:
    from emassist.serve.predict import predict_paths

    images = _folder(tmp_path)
    native = predict_paths([str(images)], classifier, progress=False).set_index("path")
    generic = predict_paths([str(images)], _GenericPyfunc(classifier), progress=False).set_index("path")
    assert sorted(generic.index) == sorted(native.index)
    good = [p for p in native.index if native.loc[p, "error"] == ""]
    assert len(good) == 3
    np.testing.assert_allclose(generic.loc[good, CLASSES].to_numpy(float), native.loc[good, CLASSES].to_numpy(float),
                               rtol=1e-6)  # fmt: skip
    for path in native.index.difference(good):  # the whole batch refused → asked one by one: each its own reason
        assert generic.loc[path, "error"] and generic.loc[path, "label"] == ""
    assert "content is text" in generic.loc[str(images / "notes.txt"), "error"]


def test_reading_a_file_for_the_log_gives_ingest_s_reasons_not_a_crash(tmp_path: Path, monkeypatch: Any) -> None:
    """prepare(file=True, details=True) reads the bytes itself (hash and decode share them): a file it may not read
    gets 'unreadable: permission denied' (as ingest says; simulated: tests run as root), a FIFO 'not a regular
    file', a missing file 'unreadable: file not found' — never a generic error."""
    import builtins
    import os

    import emassist.data.decode as decode_mod
    from emassist.serve.pyfunc import SemClassifier

    model = SemClassifier()
    model.configure({"classes": ["A", "B"], "cache_size": 32, "crop_databar": True, "max_pixels": 10**6,
                     "min_side": 8, "image_size": 32})  # fmt: skip
    locked = tmp_path / "locked.png"
    locked.write_bytes(b"\x89PNG")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    def refusing_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(decode_mod, "open", refusing_open, raising=False)
    errors = [p.error for p in model.prepare_many([str(locked), str(fifo), str(tmp_path / "gone.png")], files=True,
                                                   details=True)]  # fmt: skip
    assert errors == ["unreadable: permission denied", "not a regular file", "unreadable: file not found"]
