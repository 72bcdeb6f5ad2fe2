"""The retraining decision (emassist.pipeline.retrain): drift, corrections since the champion's data, forced, none.

A real prediction log (SQLite through SQLAlchemy) and a real MLflow registry (one SQLite store for the module,
a registered model of its own per test); the drift summary is a drift.json written by the test (the monitoring
step's contract: ``{"status": ..., "reasons": [...]}``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from emassist.config.settings import Params, params_from_dict
from emassist.data.predlog import PredictionLog
from emassist.pipeline import retrain
from emassist.pipeline.retrain import RetrainError, retrain_decision
from tests.conftest import REPO_ROOT
from tests.servers import free_port

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # the champion's training run started then
_names = itertools.count()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow SQLite store for the module (its first opening migrates the schema: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def params(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Params]:
    """params.yaml with the log, the feedback folder and the drift summary in ``tmp_path``, threshold 3, and a
    registered model name no other test uses."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "EMASSIST_MONITORING_DB_URI"):
        monkeypatch.delenv(var, raising=False)
    for var in [k for k in os.environ if k.startswith(retrain.ENV_PREFIX)]:
        monkeypatch.delenv(var)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["monitoring"] |= {"db_uri": f"sqlite:///{tmp_path / 'log.db'}", "retrain_min_corrections": 3,
                          "feedback_dir": str(tmp_path / "feedback")}  # fmt: skip
    raw["mlflow"] |= {"tracking_uri": mlflow_uri, "registered_model": f"m{next(_names)}"}
    yield params_from_dict(raw)


def write_drift(status: str, *reasons: str, **extra: Any) -> None:
    path = retrain.DRIFT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": status, "reasons": list(reasons), **extra}))


def correct(params: Params, *when: datetime, status: str = "ok", prefix: str = "a") -> None:
    store = PredictionLog(params.monitoring.resolved_db_uri())
    for i, ts in enumerate(when):
        sha = f"{prefix}{i:063x}"
        store.add_correction(sha, "Nanowires", old_label="Particles", who="t", status=status, ts=ts)
    store.dispose()


def make_champion(params: Params, *, feedback_images: int | None = 2, data_version: str = "dv-champ") -> str:
    """A registered version with alias champion whose run started at :data:`T0`."""
    from mlflow import MlflowClient

    client = MlflowClient(params.mlflow.tracking_uri)
    name = params.mlflow.registered_model
    experiment = client.get_experiment_by_name("retrain-tests")
    exp_id = experiment.experiment_id if experiment else client.create_experiment("retrain-tests")
    tags = {"data_version": data_version}
    if feedback_images is not None:
        tags[retrain.FEEDBACK_TAG] = str(feedback_images)
    run = client.create_run(exp_id, start_time=int(T0.timestamp() * 1000), tags=tags)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_model_version_tag(name, mv.version, "data_version", data_version)
    client.set_registered_model_alias(name, "champion", mv.version)
    return str(mv.version)


def feedback_files(params: Params, n: int) -> None:
    for i in range(n):
        path = Path(params.monitoring.feedback_dir) / "Nanowires" / f"{i:064x}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")


# --------------------------------------------------------------------------------------------- the branches


def test_empty_log_and_no_champion_is_nothing_to_do(params: Params) -> None:
    write_drift("not_enough_data", "not enough data: 0 predictions in the last 7 days, monitoring.min_rows=50")
    d = retrain_decision(params)
    assert (d.run, d.trigger, d.drift_status, d.n_new_corrections) == (False, "none", "not_enough_data", 0)
    assert d.champion_version is None and d.champion_data_version is None and d.since is None
    assert d.reasons == [
        "drift check: not enough data: 0 predictions in the last 7 days, monitoring.min_rows=50",
        "0 newly corrected images since the beginning of the log (no champion yet), < the threshold "
        "monitoring.retrain_min_corrections=3",
    ]
    assert d.summary().startswith("nothing to do: drift check: not enough data")


def test_drift_triggers(params: Params) -> None:
    write_drift("drift", "class mix: 6 of 10 columns drifted (share 0.60 ≥ monitoring.drift_share=0.5)")
    d = retrain_decision(params)
    assert d.run and d.trigger == "drift" and d.drift_status == "drift"
    assert "drift in the last 7 days of predictions: class mix: 6 of 10 columns drifted" in d.reasons[0]
    assert d.environment()["EMASSIST_RETRAIN_TRIGGER"] == "drift"


def test_corrections_since_the_champion_trigger(params: Params) -> None:
    write_drift("no_drift", "share of drifted columns 0.10 < 0.5")
    version = make_champion(params, feedback_images=2)
    correct(params, T0 - timedelta(days=2), T0 - timedelta(hours=1), prefix="b")  # in the champion's data already
    correct(params, *(T0 + timedelta(hours=h) for h in (1, 2, 3)))
    correct(params, T0 + timedelta(hours=4), status="conflicting", prefix="c")
    feedback_files(params, 5)
    d = retrain_decision(params)
    assert d.run and d.trigger == "corrections"
    assert (d.n_new_corrections, d.conflicting, d.champion_version, d.champion_data_version) == (3, 1, version,
                                                                                                "dv-champ")  # fmt: skip
    assert d.since == T0
    assert (d.feedback_images, d.champion_feedback_images, d.added_images) == (5, 2, 3)
    assert d.reasons[0] == "no drift in the last 7 days of predictions (share of drifted columns 0.10 < 0.5)"
    assert d.reasons[1] == (f"3 newly corrected images since champion v{version} was trained (2026-11-20 12:00 UTC), "
                            "≥ the threshold monitoring.retrain_min_corrections=3")  # fmt: skip
    assert "1 images with conflicting corrections not counted" in d.reasons[2]
    env = d.environment()
    assert env == {
        "EMASSIST_RETRAIN_TRIGGER": "corrections",
        "EMASSIST_RETRAIN_REASONS": "; ".join(d.reasons),
        "EMASSIST_RETRAIN_BASE_VERSION": version,
        "EMASSIST_RETRAIN_BASE_DATA_VERSION": "dv-champ",
        "EMASSIST_RETRAIN_NEW_CORRECTIONS": "3",
        "EMASSIST_RETRAIN_ADDED_IMAGES": "3",
        "EMASSIST_RETRAIN_FEEDBACK_IMAGES": "5",
    }
    json.dumps(d.as_dict())  # the flow's result: plain JSON


def test_corrections_below_the_threshold_is_nothing_to_do(params: Params) -> None:
    write_drift("no_drift")
    version = make_champion(params, feedback_images=None)
    correct(params, T0 - timedelta(days=1), T0 - timedelta(days=2), T0 - timedelta(days=3), prefix="b")
    correct(params, T0 + timedelta(minutes=5), T0 + timedelta(minutes=6))
    d = retrain_decision(params)
    assert not d.run and d.trigger == "none" and d.n_new_corrections == 2
    assert f"2 newly corrected images since champion v{version} was trained" in d.reasons[1]
    assert "< the threshold monitoring.retrain_min_corrections=3" in d.reasons[1]
    assert d.champion_feedback_images is None and d.added_images == 2  # not recorded: the corrections count


def test_same_image_corrected_twice_counts_once(params: Params) -> None:
    write_drift("no_drift")
    store = PredictionLog(params.monitoring.resolved_db_uri())
    for label in ("Nanowires", "Nanowires", "Fibres"):
        store.add_correction("d" * 64, label, ts=T0)
    store.add_correction("e" * 64, "Fibres", ts=T0)
    d = retrain_decision(params)
    assert d.n_new_corrections == 2 and not d.run
    assert "2 newly corrected images (4 correction rows) since the beginning of the log" in d.reasons[1]


def test_no_champion_counts_every_correction(params: Params) -> None:
    write_drift("no_drift")
    correct(params, T0 - timedelta(days=300), T0 - timedelta(days=30), T0)
    d = retrain_decision(params)
    assert d.run and d.trigger == "corrections" and d.n_new_corrections == 3 and d.champion_version is None
    assert "since the beginning of the log (no champion yet)" in d.reasons[1]


def test_forced(params: Params) -> None:
    write_drift("no_drift")
    d = retrain_decision(params, force=True)
    assert d.run and d.trigger == "forced" and d.reasons[0] == retrain.FORCED_REASON
    assert "0 newly corrected images" in d.reasons[2]  # the figures are still reported
    forced_with_drift = retrain_decision(params, force=True, drift={"status": "drift", "reasons": ["dark"]})
    assert forced_with_drift.trigger == "drift"  # the stronger reason is named


def test_no_drift_summary_decides_on_corrections(params: Params) -> None:
    d = retrain_decision(params)
    assert d.drift_status == "missing" and not d.run
    assert d.reasons[0] == f"no drift summary at {retrain.DRIFT_FILE}: the monitoring step has not run"


# --------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "drift summary reports/monitoring/drift.json is unreadable"),
        ('{"status": "maybe"}', "status must be one of ('drift', 'no_drift', 'not_enough_data'), got 'maybe'"),
        ('["drift"]', "expected a JSON object, got list"),
        ('{"status": "drift", "reasons": "dark"}', "reasons must be a list of sentences"),
    ],
)
def test_bad_drift_summary_is_a_clear_error(params: Params, content: str, message: str) -> None:
    retrain.DRIFT_FILE.parent.mkdir(parents=True)
    retrain.DRIFT_FILE.write_text(content)
    with pytest.raises(RetrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        retrain_decision(params)


def test_unreachable_log_store_is_a_clear_error(
    params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_drift("drift")
    monkeypatch.setenv("EMASSIST_MONITORING_DB_URI", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'log.db'}")
    with pytest.raises(RetrainError, match="cannot count the corrections: cannot open the prediction log"):
        retrain_decision(params)


def test_unreachable_registry_is_an_error_not_no_champion(params: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    write_drift("no_drift")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(RetrainError, match=r"cannot read the champion of 'm\d+' from MLflow"):
        retrain_decision(params)


def test_bad_trigger_is_refused() -> None:
    with pytest.raises(ValueError, match="trigger must be one of"):
        retrain.retrain_environment("because", ["x"])


# --------------------------------------------------------------------------------------------- the run's tags


def test_environment_tags_the_training_run(params: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    from emassist.model.tracking import run_tags

    monkeypatch.setattr("emassist.model.tracking.git_commit", lambda: "abc")
    monkeypatch.setenv("EMASSIST_RETRAIN_STALE", "from an earlier run")
    env = retrain.retrain_environment("corrections", ["25 newly corrected images"], base_version="3",
                                      base_data_version="dv3", new_corrections=25, added_images=4,
                                      feedback_images=9)  # fmt: skip
    with retrain.environment(env):
        tags = run_tags(params)
    assert {k: v for k, v in tags.items() if k.startswith("retrain_")} == {
        "retrain_trigger": "corrections",
        "retrain_reasons": "25 newly corrected images",
        "retrain_base_version": "3",
        "retrain_base_data_version": "dv3",
        "retrain_new_corrections": "25",
        "retrain_added_images": "4",
        "retrain_feedback_images": "9",
    }
    assert os.environ["EMASSIST_RETRAIN_STALE"] == "from an earlier run"  # restored afterwards
    monkeypatch.delenv("EMASSIST_RETRAIN_STALE")
    plain = run_tags(params)
    assert not [k for k in plain if k.startswith("retrain_")]


def test_monitoring_step_falls_back_to_its_last_summary(params: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "emassist.pipeline.monitor", None)  # as if not installed: ImportError
    write_drift("drift", "darker images")
    assert retrain.run_monitoring(params) == {"status": "drift", "reasons": ["darker images"]}


def test_artifacts_name_the_decision(params: Params) -> None:
    from pipelines import artifacts

    write_drift("no_drift", "fine", share=0.1, html="reports/monitoring/drift.html")
    d = retrain_decision(params)
    text = artifacts.decision_markdown(d)
    assert "**nothing to do**" in text and "| newly corrected images | 0 (threshold 3) |" in text
    assert "| champion | none yet |" in text
    drift = artifacts.drift_markdown(d.drift)
    assert "**no_drift**" in drift and "- fine" in drift and "| share | 0.1 |" in drift
    assert artifacts.drift_report_url(d.drift, "sqlite:///mlflow.db") is None
    assert artifacts.drift_report_url({"html_url": "http://h/r.html"}, "sqlite:///x") == "http://h/r.html"
    trigger = artifacts.trigger_markdown("drift", ["dark"], {"base_version": "2", "added_images": None})
    assert "**trigger: drift**" in trigger and "| base_version | 2 |" in trigger and "added_images" not in trigger
