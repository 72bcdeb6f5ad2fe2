"""Training and evaluation end to end on tiny images, tracked in a local MLflow store."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emassist.config.settings import Params, ParamsError, load_params, params_from_dict
from emassist.data.dataset import DatasetError, class_weights, make_dataset, read_split
from tests import helpers
from tests.conftest import REPO_ROOT

CLASSES = ["Particles", "Nanowires", "Tips"]


def _pattern(label: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Three easily separable textures: blobs, stripes and a bright apex."""
    yy, xx = np.mgrid[:size, :size]
    if label == "Particles":
        img = np.zeros((size, size))
        for _ in range(6):
            cy, cx, r = [*rng.integers(4, size - 4, 2).tolist(), rng.integers(2, 5)]
            img += ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * 200
    elif label == "Nanowires":
        img = (np.sin((xx + rng.integers(0, 8)) / 1.5) > 0.6) * 220.0
    else:
        img = np.clip(255 - 6 * np.abs(xx - size / 2) - 3 * (size - yy), 0, 255)
    img = img + rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_project(root: Path, n_per_class: int = 24) -> None:
    """A miniature of the pipeline's outputs: cached PNGs and the three split CSVs."""
    rng = np.random.default_rng(0)
    images = root / "data" / "interim" / "images"
    images.mkdir(parents=True)
    rows = []
    for label in CLASSES:
        for i in range(n_per_class):
            name = f"{label}_{i}"
            Image.fromarray(_pattern(label, rng)).save(images / f"{name}.png")
            split = "train" if i < n_per_class * 0.6 else ("val" if i < n_per_class * 0.8 else "test")
            rows.append({"sha256": name, "label": label, "image_path": f"data/interim/images/{name}.png",
                         "source_path": f"{label}/{i}.png", "group": len(rows), "split": split})  # fmt: skip
    frame = pd.DataFrame(rows)
    # ingest's manifest, where the default (scale-aware) model finds each image's pixel size: known for most images
    # (one per class), unknown for every fifth
    sizes = {"Particles": 5.0, "Nanowires": 20.0}
    manifest = frame[["sha256", "label"]].assign(
        pixel_size_nm=[None if k % 5 == 0 else sizes.get(label, 80.0) for k, label in enumerate(frame["label"])],
        width=40,
    )
    manifest.to_parquet(root / "data" / "interim" / "manifest.parquet", index=False)
    splits = root / "data" / "splits"
    splits.mkdir(parents=True)
    for name, part in frame.groupby("split"):
        part.drop(columns="split").to_csv(splits / f"{name}.csv", index=False)
    # What the augment stage writes with nothing to grow: the train list with an empty augmented_from column.
    augmented = root / "data" / "augmented"
    augmented.mkdir(parents=True)
    train = pd.read_csv(splits / "train.csv", keep_default_na=False)
    train.assign(augmented_from="").to_csv(augmented / "train.csv", index=False)


def tiny_params(**train: object) -> Params:
    """Checked settings: params.yaml with this file's classes, online augmentation and a tiny simple_cnn."""
    return params_from_dict(
        helpers.tiny_params(
            {"data": {"classes": CLASSES}, "augment": {"online": True},
             "train": {"model": "simple_cnn", "image_size": 32, "batch_size": 8, "epochs": 3,
                       "early_stopping_patience": 5, "learning_rate": 0.003, **train}}
        )
    )  # fmt: skip


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_dataset_batches_have_model_shape(project: Path) -> None:
    split = read_split(Path("data/splits/train.csv"), CLASSES)
    ds = make_dataset(split, image_size=32, batch_size=5, training=False)
    x, y = next(iter(ds))
    assert tuple(x.shape) == (5, 32, 32, 3) and x.dtype.name == "float32"
    assert float(np.max(x)) <= 255 and float(np.min(x)) >= 0
    assert y.numpy().tolist() == split.labels[:5].tolist()
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[1] == pytest.approx(3 * weights[0]) and weights[2] == 1.0


def test_train_and_evaluate_track_everything_in_mlflow(project: Path) -> None:
    import mlflow

    from emassist.model.files import CALIBRATION_FILE, MODEL_FILE, RUN_FILE
    from emassist.model.testset import evaluate
    from emassist.model.training import train

    params = tiny_params()
    result = train(params)
    assert MODEL_FILE.is_file() and RUN_FILE.is_file()
    losses = result.history["loss"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    metrics = evaluate(params)
    headline = json.loads(Path("reports/metrics.json").read_text())
    assert headline["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert headline["accuracy"] > 0.6, headline  # three easy textures
    for name in ("confusion_matrix.png", "confusion.csv", "history.csv", "training_curves.png"):
        assert (Path("reports/plots") / name).is_file(), name
    # calibration: the temperature fitted on val, the test ECE/NLL before and after, the reliability diagram
    calibration = json.loads(CALIBRATION_FILE.read_text())
    assert calibration["temperature"] > 0 and calibration["n_val"] > 0
    for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
        assert headline[key] == pytest.approx(calibration[key]), key
        assert 0 <= headline[key] < 100, key
    assert calibration["val_classes_missing"] == []
    for name in ("reliability.csv", "reliability_diagram.png", "risk_coverage.csv", "risk_coverage.png"):
        assert (Path("reports/plots") / name).is_file(), name
    # abstention and familiarity: fitted on val (and train), reported on test, shipped beside the model
    assert calibration["target_accuracy"] == 0.99 and "review_message" in calibration
    assert (calibration["review_threshold"] is None) == (not calibration["target_reached"])
    assert 0.0 <= headline["coverage"] <= 1.0 and 0.0 <= headline["unfamiliar_share"] <= 1.0
    assert headline["review_threshold"] == calibration["review_threshold"]
    from emassist.model.familiarity import Familiarity
    from emassist.model.files import FAMILIARITY_FILE

    assert Familiarity.load(FAMILIARITY_FILE).threshold == pytest.approx(calibration["unfamiliar_threshold"])
    # the drift report's reference: one row per test image, in the prediction log's columns, by the served rule
    from emassist.model.drift import REFERENCE_FILE
    from emassist.model.testset import TEST_PREDICTIONS_FILE

    assert TEST_PREDICTIONS_FILE == REFERENCE_FILE  # the monitor reads the file the evaluate stage writes
    answers = pd.read_parquet(REFERENCE_FILE)
    test_split = pd.read_csv("data/splits/test.csv", keep_default_na=False)
    assert list(answers["sha256"]) == list(test_split["sha256"])
    assert list(answers["true_label"]) == list(test_split["label"]) and set(answers["label"]) <= set(CLASSES)
    assert answers["confidence"].between(0, 1).all() and answers["brightness"].between(0, 255).all()
    assert all(abs(sum(json.loads(p).values()) - 1) < 1e-3 for p in answers["probabilities"])
    assert answers["unfamiliar"].mean() == pytest.approx(headline["unfamiliar_share"])
    if headline["review_threshold"] is not None:
        assert 1 - answers["needs_review"].mean() == pytest.approx(headline["coverage"])
    else:
        assert answers["needs_review"].all()
    curve = pd.read_csv("reports/plots/risk_coverage.csv")
    assert list(curve.columns) == ["threshold", "coverage", "selective_accuracy", "risk"]
    assert curve["coverage"].is_monotonic_increasing and curve["coverage"].iloc[-1] == pytest.approx(
        1.0 - headline["unfamiliar_share"], abs=1e-6
    )

    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    run = mlflow.get_run(result.run_id)
    assert run.data.params["train.model"] == "simple_cnn"
    assert run.data.params["train.image_size"] == "32"
    assert run.data.params["data.classes"] == ",".join(CLASSES)
    for tag in ("git_commit", "data_version", "splits_md5"):
        assert run.data.tags.get(tag), tag
    assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert run.data.metrics["test_ece_after"] == pytest.approx(calibration["ece_after"])
    assert run.data.metrics["test_temperature"] == pytest.approx(calibration["temperature"])
    client = mlflow.MlflowClient()
    val_loss = client.get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in val_loss] == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"plots", "model", "evaluation", "history.json"} <= artifacts
    evaluation = {Path(a.path).name for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"confusion_matrix.png", "metrics.json", "confused_pairs.csv"} <= evaluation
    assert {"reliability.csv", "reliability_diagram.png", "calibration.json", "test_predictions.parquet"} <= evaluation

    # a val split with a class missing: the temperature is still fitted, the report names the class
    val = pd.read_csv("data/splits/val.csv", keep_default_na=False)
    val[val["label"] != CLASSES[-1]].to_csv("data/splits/val.csv", index=False)
    evaluate(params)
    calibration = json.loads(CALIBRATION_FILE.read_text())
    assert calibration["val_classes_missing"] == [CLASSES[-1]]
    assert calibration["temperature"] > 0 and calibration["n_val"] == int((val["label"] != CLASSES[-1]).sum())


def test_cosine_schedule_replaces_reduce_on_plateau(project: Path) -> None:
    import mlflow

    from emassist.model.training import _callbacks, train

    params = tiny_params(model="compact_cnn", lr_schedule="cosine", epochs=3)
    assert not any(type(c).__name__ == "ReduceLROnPlateau" for c in _callbacks(params, [0]))
    assert any(type(c).__name__ == "ReduceLROnPlateau" for c in _callbacks(tiny_params(lr_schedule="plateau"), [0]))
    result = train(params)
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    rates = [m.value for m in mlflow.MlflowClient().get_metric_history(result.run_id, "learning_rate")]
    assert len(rates) == 3 and rates[0] > rates[1] > rates[2] >= 0, rates  # 0 after the last step
    assert rates[0] < params.train.learning_rate  # already decayed by the first epoch's steps
    assert mlflow.get_run(result.run_id).data.params["train.lr_schedule"] == "cosine"


@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"model": "resnet9000"}, "train.model"),
        ({"epochs": -1}, "train.epochs"),
        ({"model": "xception", "image_size": 96, "weights": "no/such/weights.h5"}, "train.weights"),
        ({"model": "xception", "image_size": 32}, "train.image_size"),
    ],
)
def test_bad_train_params_fail_before_training(train: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        tiny_params(**train)


def test_empty_split_and_missing_image_fail_before_training(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from emassist.model import training

    started = []
    monkeypatch.setattr(training, "make_dataset", lambda *a, **k: started.append(1))
    params = tiny_params()
    val = Path("data/splits/val.csv")
    pd.read_csv(val).iloc[0:0].to_csv(val, index=False)
    with pytest.raises(DatasetError, match=r"val\.csv: the split is empty"):
        training.train(params)
    make_project_dir = Path("data/interim/images/Tips_0.png")
    make_project_dir.unlink()
    with pytest.raises(DatasetError, match=r"Tips_0\.png"):
        read_split(Path("data/splits/train.csv"), CLASSES)
    assert not started


def test_train_stage_cli_reports_missing_split(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from emassist.pipeline.stagerun import run_stage
    from stages import train as train_stage

    (project / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    Path("data/splits/val.csv").unlink()
    assert run_stage("train", "", train_stage.main, []) == 1
    assert "val.csv: split file not found" in capsys.readouterr().err
    Path("data/augmented/train.csv").unlink()
    assert run_stage("train", "", train_stage.main, []) == 1
    err = capsys.readouterr().err
    assert "data/augmented/train.csv" in err and "dvc repro augment" in err


def test_training_reads_the_augmented_list_never_the_plain_split(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.augmented_dir/train.csv is what training reads; without it training stops (no silent fallback to
    data/splits/train.csv), before any dataset is built."""
    from emassist.model import training

    started = []
    monkeypatch.setattr(training, "make_dataset", lambda *a, **k: started.append(1))
    params = tiny_params()
    grown = Path("data/elsewhere")
    grown.mkdir()
    augmented = pd.read_csv("data/augmented/train.csv", keep_default_na=False)
    augmented.iloc[:5].to_csv(grown / "train.csv", index=False)
    moved = dataclasses.replace(params, data=dataclasses.replace(params.data, augmented_dir=str(grown)))
    assert training.train_split_csv(moved) == grown / "train.csv"
    assert len(training.load_splits(moved)[0]) == 5
    shutil.rmtree("data/augmented")
    assert Path("data/splits/train.csv").is_file()
    with pytest.raises(
        DatasetError, match=r"data/augmented/train\.csv.*run the augment stage first \(dvc repro augment\)"
    ):
        training.train(params)
    assert not started


def test_params_round_trip_of_repo_defaults() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert dataclasses.asdict(params)["train"]["model"] in ("simple_cnn", "compact_cnn", "xception")


# ---------------------------------------------------------------------------------- runs a training does not finish


def _store(project: Path) -> Any:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigterm_marks_the_run_killed_and_the_next_start_fails_orphans(project: Path) -> None:
    """A real training in a subprocess, SIGTERMed during fit: its run ends KILLED (not RUNNING forever) and the
    process dies of the signal. At its start it closed, as FAILED, the RUNNING train run left by a process that is
    gone, and left alone a run whose process lives and a run the train stage did not start."""
    from emassist.model.tracking import HOST_TAG, PID_TAG, STAGE_TAG, process_tags, setup_mlflow

    params = tiny_params()
    client = _store(project)
    setup_mlflow(params)
    experiment = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
    orphan = client.create_run(experiment, tags={**process_tags("train"), PID_TAG: str(_dead_pid())}).info.run_id
    alive = client.create_run(experiment, tags=process_tags("train")).info.run_id  # this test's own process
    elsewhere = client.create_run(
        experiment, tags={**process_tags("train"), HOST_TAG: "another-host", PID_TAG: str(_dead_pid())}
    ).info.run_id
    untagged = client.create_run(experiment).info.run_id

    script = (
        "from tests.code.test_training import tiny_params\n"
        "from emassist.model.training import train\n"
        "train(tiny_params(epochs=400, early_stopping_patience=400))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    log = (project / "train.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = client.search_runs([experiment], filter_string=f"tags.`{PID_TAG}` = '{proc.pid}'")
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):  # inside fit: an epoch is logged
                run_id = runs[0].info.run_id
                break
            time.sleep(0.5)
        assert run_id is not None, (project / "train.log").read_text()[-3000:]
        assert client.get_run(run_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say where it is stuck (py-spy is in the dev extras)
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
            pytest.fail(f"no exit 120 s after SIGTERM\n{dump.stdout}{dump.stderr}\n"
                        f"{(project / 'train.log').read_text()[-3000:]}")  # fmt: skip
        assert status == -signal.SIGTERM, (project / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags[STAGE_TAG] == "train" and killed.data.tags[PID_TAG] == str(proc.pid)
    assert client.get_run(orphan).info.status == "FAILED"
    for kept in (alive, elsewhere, untagged):
        assert client.get_run(kept).info.status == "RUNNING", kept


def test_sigint_marks_the_active_run_killed_and_still_interrupts(project: Path) -> None:
    import mlflow

    from emassist.model.tracking import end_run_on_signal, setup_mlflow

    _store(project)
    setup_mlflow(tiny_params())
    # Python's own SIGINT handler, whatever the suite was started from (a shell's background job ignores SIGINT,
    # and end_run_on_signal rightly leaves an ignored signal alone).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), end_run_on_signal(), mlflow.start_run() as run:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs before this ends
        assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "KILLED"
        assert mlflow.active_run() is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    finally:
        signal.signal(signal.SIGINT, outer)


def test_an_ignored_signal_stays_ignored(project: Path) -> None:
    from emassist.model.tracking import end_run_on_signal

    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with end_run_on_signal():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # e.g. a background job: not taken over
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_orphans_are_closed_only_for_gone_processes_of_the_stage(project: Path) -> None:
    from emassist.model.tracking import PID_TAG, close_orphaned_runs, process_tags, setup_mlflow

    params = tiny_params()
    client = _store(project)
    setup_mlflow(params)
    experiment = client.get_experiment_by_name(params.mlflow.experiment).experiment_id
    gone = client.create_run(experiment, tags={**process_tags("train"), PID_TAG: str(_dead_pid())}).info.run_id
    other_stage = client.create_run(experiment, tags={**process_tags("evaluate"), PID_TAG: str(_dead_pid())})
    finished = client.create_run(experiment, tags={**process_tags("train"), PID_TAG: str(_dead_pid())}).info.run_id
    client.set_terminated(finished, status="FINISHED")
    assert close_orphaned_runs(experiment, "train") == [gone]
    assert client.get_run(gone).info.status == "FAILED"
    assert client.get_run(gone).data.tags["emassist.closed"].startswith("orphaned: process")
    assert client.get_run(other_stage.info.run_id).info.status == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED"
    assert close_orphaned_runs(experiment, "train") == []


def test_sigint_inside_a_run_unwinds_first_then_marks_it_killed(tmp_path: Path) -> None:
    """The handler only notes the run and raises; the run (closed FAILED by ``start_run`` on the way out) ends KILLED,
    and the previous SIGINT handler still gives ``KeyboardInterrupt``; a ``finally`` of the body ran before."""
    import mlflow

    from emassist.model.tracking import end_run_on_signal

    client = _store(tmp_path)
    mlflow.set_experiment("signals")
    unwound: list[str] = []
    run_id = ""
    with pytest.raises(KeyboardInterrupt), end_run_on_signal(), mlflow.start_run() as run:
        run_id = run.info.run_id
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler's exception interrupts this
        finally:
            unwound.append("body")
    assert unwound == ["body"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert mlflow.active_run() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _SignalsInsideDel:
    """An object whose ``__del__`` receives ``signum``: the handler then runs inside ``__del__``, where Python swallows
    whatever it raises ("Exception ignored in"), as it does inside TensorFlow's many ``__del__`` methods."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        until = time.monotonic() + 0.3
        while time.monotonic() < until:  # bytecode runs here, so the handler runs here, inside __del__
            pass


def test_a_stop_lost_inside_a_del_is_raised_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGINT's exception is swallowed inside a ``__del__``; the watcher raises it again, so the body still stops
    within a few intervals (not after its 20 s) and the run still ends KILLED."""
    import mlflow

    from emassist.model.tracking import end_run_on_signal

    client = _store(tmp_path)
    mlflow.set_experiment("signals")
    lost: list[str] = []  # what Python swallowed ("Exception ignored in")
    monkeypatch.setattr(sys, "unraisablehook", lambda u: lost.append(type(u.exc_value).__name__))
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt), end_run_on_signal(resend_interval_s=0.5), mlflow.start_run() as run:
            _SignalsInsideDel(signal.SIGINT)  # dropped at once: its __del__ runs here, and the stop is lost there
            time.sleep(20)  # one blocking call: the stop raised again must wake it, as a signal does
        waited = time.monotonic() - started
        assert waited < 10, waited
        assert lost == ["_Stopped"]  # it really was lost once
        assert client.get_run(run.info.run_id).info.status == "KILLED"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_a_stop_lost_just_before_the_body_ends_still_acts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body ends before the watcher raises the lost stop again: leaving the block acts on it (SIGINT:
    ``KeyboardInterrupt``) instead of forgetting the signal."""
    from emassist.model.tracking import end_run_on_signal

    lost: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: lost.append(type(u.exc_value).__name__))
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), end_run_on_signal(resend_interval_s=60):
            _SignalsInsideDel(signal.SIGINT)
        assert lost == ["_Stopped"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
