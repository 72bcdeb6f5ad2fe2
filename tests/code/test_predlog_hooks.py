"""Every answer logged, in-process: the pyfunc's opt-in server hook (``EMASSIST_PREDICTION_LOG``), ``emassist
predict`` (one ``cli`` row per answered file) and ``emassist scan`` (one ``scan`` row for the overview), each on a
real SQLite file, and each answering on when its log cannot be opened."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.helpers import BRIGHTNESS_CLASSES as CLASSES
from tests.helpers import b64, brightness_model, image_bytes, models_cli, texture

pytest.importorskip("keras")

FEI = "[System]\nSystemType=Quanta 250 FEG\n[Beam]\nHV=20000\n[Scan]\nPixelWidth=5e-010\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    tmp = tmp_path_factory.mktemp("predlog")
    brightness_model(tmp / "model.keras", conv=True)
    raw = {
        "data": {"classes": CLASSES},
        "ingest": {"cache_size": 64, "max_pixels": 4_000_000, "min_side": 16},
        "train": {"image_size": 32},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "monitoring": {"batch_size": 4, "flush_interval_s": 0.2},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The log these tests write (EMASSIST_MONITORING_DB_URI wins over monitoring.db_uri)."""
    url = f"sqlite:///{tmp_path / 'log' / 'monitoring.db'}"
    (tmp_path / "log").mkdir()
    monkeypatch.setenv("EMASSIST_MONITORING_DB_URI", url)
    return url


def new_classifier(model_dir: Path) -> Any:
    from emassist.config.settings import load_params
    from emassist.model.registry import serving_config
    from emassist.serve.pyfunc import SemClassifier

    return SemClassifier.from_files(model_dir / "model.keras", serving_config(load_params(model_dir / "params.yaml")))


def fei_tiff(seed: int = 5) -> bytes:
    from PIL import Image, TiffImagePlugin

    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[34682] = FEI
    ifd.tagtype[34682] = 2  # ASCII
    buf = io.BytesIO()
    Image.fromarray(texture(60, 80, seed=seed)).save(buf, format="TIFF", tiffinfo=ifd)
    return buf.getvalue()


def logged(url: str) -> pd.DataFrame:
    from emassist.data.predlog import PredictionLog

    return PredictionLog(url).predictions()


# --------------------------------------------------------------------------------------------- scoring server hook


def test_server_hook_logs_each_answered_row(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("EMASSIST_PREDICTION_LOG", url)
    monkeypatch.setenv("EMASSIST_MODEL_NAME", "sem-classifier")
    monkeypatch.setenv("EMASSIST_MODEL_VERSION", "7")
    monkeypatch.setenv("EMASSIST_MODEL_ALIAS", "champion")
    model = new_classifier(model_dir)  # load() opens the log from the environment
    assert model.prediction_log is not None
    blobs = [image_bytes("png", seed=1, level=40), fei_tiff(), image_bytes("jpeg", seed=2, level=200)]
    values = [b64(blobs[0]), "not base64 $$", b64(blobs[1]), b64(blobs[2])]
    frame = model.predict(None, pd.DataFrame({"image": values}))
    assert frame["error"].astype(bool).tolist() == [False, True, False, False]
    tiles = model.predict(None, pd.DataFrame({"image": [b64(blobs[0])]}), params={"standardized": True})
    assert tiles["error"].tolist() == [""]  # answered, but a tile request is not logged (the scan logs its summary)
    model.prediction_log.close()
    rows = logged(url)
    assert len(rows) == 3 and set(rows["source"]) == {"server"}
    assert list(rows["sha256"]) == [hashlib.sha256(b).hexdigest() for b in blobs]  # the file's bytes, as ingest
    assert list(rows["format"]) == ["PNG", "TIFF", "JPEG"]
    assert list(rows["width"]) == [48, 80, 48] and list(rows["height"]) == [40, 60, 40]
    assert rows["pixel_size_nm"].iloc[1] == pytest.approx(0.5) and rows["instrument"].iloc[1] == "FEI Quanta 250 FEG"
    assert rows["pixel_size_nm"].isna().iloc[0]  # a plain PNG carries none
    assert list(rows["label"]) == frame.loc[[0, 2, 3], "label"].tolist()
    np.testing.assert_allclose(rows["confidence"], frame.loc[[0, 2, 3], "confidence"], rtol=1e-6)
    stored = [json.loads(p) for p in rows["probabilities"]]
    np.testing.assert_allclose([[p[c] for c in CLASSES] for p in stored], frame.loc[[0, 2, 3], CLASSES], atol=1e-5)
    assert list(rows["needs_review"]) == frame.loc[[0, 2, 3], "needs_review"].tolist()
    assert rows["unfamiliar"].isna().all()  # this model ships no familiarity check: unknown, not "familiar"
    assert rows["brightness"].iloc[0] < 60 < 180 < rows["brightness"].iloc[2]  # of the standardized images
    assert (rows["contrast"] > 0).all()
    assert set(rows["model_name"]) == {"sem-classifier"} and set(rows["model_version"]) == {"7"}
    assert set(rows["model_alias"]) == {"champion"} and set(rows["origin"]) == {""}


def test_server_without_the_variable_logs_nothing(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMASSIST_PREDICTION_LOG", raising=False)
    model = new_classifier(model_dir)
    assert model.prediction_log is None
    assert model.predict(None, pd.DataFrame({"image": [b64(image_bytes("png"))]}))["error"].tolist() == [""]


@pytest.mark.parametrize("url", ["not a url", "nosuchdriver://x/y"])
def test_server_with_an_unusable_url_warns_once_and_answers(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    monkeypatch.setenv("EMASSIST_PREDICTION_LOG", url)
    caplog.set_level(logging.WARNING)
    model = new_classifier(model_dir)
    assert model.prediction_log is None
    for _ in range(3):
        assert model.predict(None, pd.DataFrame({"image": [b64(image_bytes("png"))]}))["label"].iloc[0] in CLASSES
    off = [r for r in caplog.records if "prediction log off" in r.getMessage()]
    assert len(off) == 1 and "not usable" in off[0].getMessage()


def test_server_with_an_unwritable_store_answers_and_warns_once(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EMASSIST_PREDICTION_LOG", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'log.db'}")
    caplog.set_level(logging.WARNING)
    model = new_classifier(model_dir)
    writer = model.prediction_log
    assert writer is not None
    for seed in range(3):
        frame = model.predict(None, pd.DataFrame({"image": [b64(image_bytes("png", seed=seed))]}))
        assert frame["error"].tolist() == [""]
        writer.flush()  # each attempt fails (the thread is asleep: flush_interval 1 s, batch 64)
    assert writer.stats["written"] == 0 and writer.stats["failed_writes"] >= 3 and writer.pending == 3  # kept
    assert len([r for r in caplog.records if "prediction log unavailable" in r.getMessage()]) == 1
    writer.close(close_timeout_s=0.2)
    assert writer.stats["dropped"] == 3


# --------------------------------------------------------------------------------------------- emassist predict


def write_images(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "dark.png": image_bytes("png", seed=1, level=30),
        "fei.tif": fei_tiff(),
        "bright.jpg": image_bytes("jpeg", seed=2, level=220),
        "notes.txt": b"not an image\n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_predict_logs_every_answered_file(
    model_dir: Path, tmp_path: Path, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_images(tmp_path / "images")
    out = tmp_path / "p.csv"
    code = models_cli(model_dir / "params.yaml", "predict", str(tmp_path / "images"),
                      "--model", str(model_dir / "model.keras"), "--out", str(out), "--no-progress")  # fmt: skip
    assert code == 3  # notes.txt failed
    csv = pd.read_csv(out, keep_default_na=False).set_index("path")
    rows = logged(db).set_index("origin")  # closed (flushed) before the command returned
    good = [str(tmp_path / "images" / n) for n in ("bright.jpg", "dark.png", "fei.tif")]
    assert sorted(rows.index) == sorted(good)  # the bad file is not logged
    assert set(rows["source"]) == {"cli"} and set(rows["model_name"]) == {"model.keras"}
    for path in good:
        assert rows.loc[path, "sha256"] == hashlib.sha256(files[Path(path).name]).hexdigest()
        assert rows.loc[path, "label"] == csv.loc[path, "label"]
        assert rows.loc[path, "confidence"] == pytest.approx(csv.loc[path, "confidence"], rel=1e-6)
        assert bool(rows.loc[path, "needs_review"]) == (str(csv.loc[path, "needs_review"]) == "True")
    fei = str(tmp_path / "images" / "fei.tif")
    assert rows.loc[fei, "pixel_size_nm"] == pytest.approx(0.5) and rows.loc[fei, "format"] == "TIFF"
    assert rows.loc[fei, "width"] == 80 and rows.loc[fei, "instrument"] == "FEI Quanta 250 FEG"
    assert "warning" not in capsys.readouterr().err


def test_predict_no_log_flag_and_log_predictions_false(model_dir: Path, tmp_path: Path, db: str) -> None:
    import yaml

    write_images(tmp_path / "images")
    common = ("--model", str(model_dir / "model.keras"), "--out", str(tmp_path / "p.csv"), "--no-progress")
    assert models_cli(model_dir / "params.yaml", "predict", str(tmp_path / "images"), *common, "--no-log") == 3
    off = yaml.safe_load((model_dir / "params.yaml").read_text())
    off["monitoring"]["log_predictions"] = False
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(off))
    assert models_cli(tmp_path / "off.yaml", "predict", str(tmp_path / "images"), *common) == 3
    assert not (tmp_path / "log" / "monitoring.db").exists()  # never even opened


@pytest.mark.parametrize("broken", ["missing-folder", "bad-url"])
def test_predict_with_the_store_down_warns_once_and_still_predicts(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], broken: str
) -> None:
    url = f"sqlite:///{tmp_path / 'absent' / 'm.db'}" if broken == "missing-folder" else "nosuchdriver://x"
    monkeypatch.setenv("EMASSIST_MONITORING_DB_URI", url)
    write_images(tmp_path / "images")
    out = tmp_path / "p.csv"
    code = models_cli(model_dir / "params.yaml", "predict", str(tmp_path / "images"),
                      "--model", str(model_dir / "model.keras"), "--out", str(out), "--no-progress")  # fmt: skip
    assert code == 3 and len(pd.read_csv(out)) == 4
    printed = capsys.readouterr()
    assert printed.out.count("ERROR") == 1 and len(printed.out.splitlines()) == 4  # answers printed as ever
    warnings = [line for line in printed.err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "predictions are not logged" in warnings[0]


# --------------------------------------------------------------------------------------------- emassist scan


def scan_cli(params_file: Path, *argv: str) -> int:
    import argparse

    from emassist.cli.web import add_commands

    parser = argparse.ArgumentParser(prog="emassist")
    parser.add_argument("--params", type=Path, default=params_file)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_scan_logs_one_summary_row(model_dir: Path, tmp_path: Path, db: str) -> None:
    from PIL import Image

    gray = texture(128, 160, seed=3)
    gray[:, 80:] = np.clip(gray[:, 80:].astype(int) + 90, 0, 255).astype(np.uint8)  # a brighter right half
    image = tmp_path / "overview.png"
    Image.fromarray(gray).save(image)
    tiles_csv = tmp_path / "tiles.csv"
    args = ("scan", str(image), "--class", "Tips", "--tile", "32", "--stride", "32", "--model",
            str(model_dir / "model.keras"), "--out", str(tmp_path / "heat.png"), "--csv", str(tiles_csv),
            "--no-progress")  # fmt: skip
    assert scan_cli(model_dir / "params.yaml", *args) == 0
    rows = logged(db)
    assert len(rows) == 1  # one row for the overview, not one per tile
    row = rows.iloc[0]
    assert row["source"] == "scan" and row["origin"] == str(image)
    assert row["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert (row["width"], row["height"], row["format"]) == (160, 128, "PNG")
    tiles = pd.read_csv(tiles_csv)
    mean = tiles[CLASSES].mean()
    assert row["label"] == mean.idxmax() and row["confidence"] == pytest.approx(mean.max(), abs=1e-5)
    stored = json.loads(row["probabilities"])
    np.testing.assert_allclose([stored[c] for c in CLASSES], mean.to_numpy(), atol=1e-5)
    assert row["needs_review"] == (row["confidence"] < 0.5)  # a .keras file without calibration: legacy 0.5
    assert scan_cli(model_dir / "params.yaml", *args, "--no-log") == 0
    assert len(logged(db)) == 1


def test_scan_with_the_store_down_warns_and_writes_its_outputs(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    monkeypatch.setenv("EMASSIST_MONITORING_DB_URI", f"sqlite:///{tmp_path / 'gone' / 'm.db'}")
    image = tmp_path / "overview.png"
    Image.fromarray(texture(96, 96, seed=4)).save(image)
    code = scan_cli(model_dir / "params.yaml", "scan", str(image), "--class", "Tips", "--tile", "32", "--stride",
                    "32", "--model", str(model_dir / "model.keras"), "--out", str(tmp_path / "heat.png"),
                    "--no-progress")  # fmt: skip
    assert code == 0 and (tmp_path / "heat.png").is_file()
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "the scan is not logged" in err


def test_a_stop_signal_switches_the_writer_to_write_through_and_hands_the_signal_on(tmp_path: Path) -> None:
    """What the scoring server installs: uvicorn's own handler (here a stand-in) still gets the signal."""
    import signal

    from emassist.data.predlog import LogWriter, PredictionLog, PredictionRow
    from emassist.serve.predlog_hooks import write_through_on_stop

    store = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(store, batch_size=100, flush_interval_s=3600)
    writer.record(PredictionRow(source="server", sha256="a" * 64, label="Tips", confidence=0.9,
                                probabilities={"Tips": 0.9}, needs_review=False))  # fmt: skip
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        assert write_through_on_stop(writer, signals=(signal.SIGUSR1,)) is True
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # handed on
        assert writer.stats["written"] == 1 and store.count() == 1  # pending row written at the signal
    finally:
        signal.signal(signal.SIGUSR1, previous)
        writer.close()
