"""The team setup against a real PostgreSQL server (initdb + postgres on a loopback port, see tests/servers.py).

* the prediction log (:class:`emassist.data.predlog.PredictionLog` and its :class:`LogWriter`): rows and corrections
  written and read back, ``find_sha256``; the server stopped while predictions go on (rows kept, written once it is
  back on the same port and data folder); a role that may only read (rows kept until it may write); an unreachable
  server and a wrong password (clear errors that never show the password);
* an ``mlflow server`` whose backend store (runs and the model registry) is a PostgreSQL database: a tiny Keras model
  registered through it with ``log_and_register`` and served by ``mlflow models serve``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from emassist.data.predlog import LogWriter, PredictionLog, PredictionLogError, PredictionRow
from tests.helpers import BRIGHTNESS_CLASSES as CLASSES
from tests.helpers import b64, brightness_model, image_bytes
from tests.servers import PostgresServer, free_port, mlflow_tracking_server, model_server, tracking_uri_env

pytestmark = pytest.mark.slow

MODEL_NAME = "sem-pg"
SHA_A = "a" * 63 + "1"
SHA_B = "b" * 63 + "2"


def row(sha256: str, label: str = "Fibres", *, origin: str = "", source: str = "web", **extra: Any) -> PredictionRow:
    """One logged answer over :data:`CLASSES` with ``label`` the most probable."""
    probabilities = {c: (0.8 if c == label else 0.1) for c in CLASSES}
    return PredictionRow(source=source, sha256=sha256, label=label, confidence=0.8, probabilities=probabilities,
                         needs_review=False, origin=origin, **extra)  # fmt: skip


def wait_until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` after ``timeout`` (a hang guard, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f} s: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One server for the module: a database per test that needs its own counts, one for MLflow."""
    with PostgresServer(tmp_path_factory.mktemp("postgres"), ("predlog", "readonly", "mlflow")) as server:
        yield server


# --------------------------------------------------------------------------------------------- prediction log


def test_prediction_log_round_trip(pg: PostgresServer) -> None:
    store = PredictionLog(pg.url("predlog"))
    t0 = datetime.now(UTC) - timedelta(hours=1)
    rows = [
        row(SHA_A, "Fibres", origin="uploads/a.tif", width=640, height=480, format="TIFF", pixel_size_nm=2.5,
            magnification=20000.0, instrument="Zeiss", brightness=101.5, contrast=33.25, model_name=MODEL_NAME,
            model_version="3", model_alias="champion", unfamiliar=False, unfamiliar_score=0.4, ts=t0),
        row(SHA_B, "Tips", origin="/data/b.png", source="cli", unfamiliar_score=float("nan")),
        row(SHA_A, "Particles", origin="uploads/a.tif", source="server"),
    ]  # fmt: skip
    assert store.write(rows) == 3
    assert store.count() == 3

    frame = store.predictions()
    assert frame["sha256"].tolist() == [SHA_A, SHA_B, SHA_A]
    assert frame["source"].tolist() == ["web", "cli", "server"]
    first = frame.iloc[0]
    assert (first["width"], first["height"], first["format"], first["instrument"]) == (640, 480, "TIFF", "Zeiss")
    assert first["pixel_size_nm"] == pytest.approx(2.5) and first["contrast"] == pytest.approx(33.25)
    assert (first["model_name"], first["model_version"], first["model_alias"]) == (MODEL_NAME, "3", "champion")
    assert json.loads(first["probabilities"]) == {"Fibres": 0.8, "Particles": 0.1, "Tips": 0.1}
    assert first["ts"] == pd.Timestamp(t0)  # timezone-aware round trip
    assert not bool(first["needs_review"]) and not bool(first["unfamiliar"])
    assert pd.isna(frame.iloc[1]["unfamiliar_score"])  # NaN stored as NULL

    assert len(store.predictions(since=t0 + timedelta(minutes=1))) == 2
    assert store.predictions(sha256=SHA_B)["label"].tolist() == ["Tips"]
    assert store.find_sha256("aaaa") == [SHA_A]
    assert store.find_sha256("/data/b.png") == [SHA_B]
    assert store.find_sha256("c0ffee") == []

    first_id = store.add_correction(SHA_A, "Tips", old_label="Particles", who="Ada", model_version="3",
                                    stored_path=f"data/feedback/Tips/{SHA_A}.tif")  # fmt: skip
    second_id = store.add_correction(SHA_A, "Fibres", old_label="Particles", who="Grace")
    assert second_id > first_id
    assert store.set_correction_status(SHA_A, "conflicting") == 2
    corrections = store.corrections(sha256=SHA_A)
    assert corrections["who"].tolist() == ["Ada", "Grace"]
    assert corrections["new_label"].tolist() == ["Tips", "Fibres"]
    assert set(corrections["status"]) == {"conflicting"}
    assert store.corrections(sha256=SHA_B).empty
    store.dispose()


def test_writer_keeps_rows_while_the_server_is_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Server stopped under a running writer: rows pile up (one warning, no exception), then all are written, once
    each, after the server restarts on the same port and data folder."""
    with PostgresServer(tmp_path, ("outage",)) as server:
        store = PredictionLog(server.url(), connect_timeout_s=2)
        writer = LogWriter(store, batch_size=4, flush_interval_s=0.1, max_pending=1000)
        try:
            writer.record_many(row(f"{i:064x}") for i in range(5))
            wait_until(lambda: writer.stats["written"] == 5, "the first rows written")

            server.stop()
            assert not server.running
            with caplog.at_level("WARNING", logger="emassist.data.predlog"):
                writer.record_many(row(f"{i:064x}", "Tips", source="server") for i in range(5, 15))
                wait_until(lambda: writer.stats["failed_writes"] >= 2, "writes failing while the server is down")
                assert writer.pending == 10 and writer.stats["dropped"] == 0
                unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
                assert len(unavailable) == 1  # one warning, not one per retry

                server.start()
                wait_until(lambda: writer.pending == 0, "the kept rows written after the restart")
            assert any("available again" in r.getMessage() for r in caplog.records)
        finally:
            writer.close()
        assert writer.stats["written"] == 15 and writer.stats["dropped"] == 0
        frame = store.predictions()
        assert len(frame) == 15 and frame["sha256"].is_unique  # every row once
        assert frame["sha256"].tolist() == [f"{i:064x}" for i in range(15)]  # in the order recorded
        store.dispose()


def test_writer_keeps_rows_while_the_store_is_read_only(pg: PostgresServer) -> None:
    """A role that may only read: writes are refused (rows kept, none dropped) until it is granted INSERT."""
    admin = PredictionLog(pg.url("readonly"))
    admin.ensure_tables()
    pg.execute("CREATE ROLE viewer LOGIN", "readonly")
    pg.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO viewer", "readonly")
    viewer_url = pg.url("readonly").replace("postgres@", "viewer@")
    store = PredictionLog(viewer_url)
    writer = LogWriter(store, batch_size=8, flush_interval_s=0.1)
    try:
        writer.record_many(row(f"{i:064x}") for i in range(3))
        wait_until(lambda: writer.stats["failed_writes"] >= 1, "a refused write")
        assert writer.pending == 3 and writer.stats["written"] == 0
        assert store.count() == 0  # it can still read
        with pytest.raises(PredictionLogError, match="permission denied"):
            store.write([row(SHA_A)])
        pg.execute("GRANT INSERT ON ALL TABLES IN SCHEMA public TO viewer", "readonly")
        pg.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO viewer", "readonly")
        wait_until(lambda: writer.pending == 0, "the kept rows written once INSERT is granted")
    finally:
        writer.close()
    assert writer.stats["written"] == 3 and writer.stats["dropped"] == 0
    assert admin.count() == 3
    store.dispose()
    admin.dispose()


def test_unreachable_server_and_wrong_password_are_clear_errors(pg: PostgresServer) -> None:
    nobody_there = f"postgresql+psycopg2://postgres:s3cret-pw@127.0.0.1:{free_port()}/predlog"
    with pytest.raises(PredictionLogError) as info:
        PredictionLog(nobody_there, connect_timeout_s=2).ensure_tables()
    message = str(info.value)
    assert "cannot open the prediction log" in message and "127.0.0.1" in message
    assert "s3cret-pw" not in message and "***" in message
    # a role that does not exist on a running server
    with pytest.raises(PredictionLogError, match='role "ghost" does not exist'):
        PredictionLog(pg.url("predlog").replace("postgres@", "ghost:pw@")).write([row(SHA_A)])
    # the writer never raises: the row is kept
    writer = LogWriter(PredictionLog(nobody_there, connect_timeout_s=1), batch_size=1, flush_interval_s=0.1)
    writer.record(row(SHA_B))
    wait_until(lambda: writer.stats["failed_writes"] >= 1, "a failed write")
    assert writer.pending == 1
    writer.close(close_timeout_s=0.5)
    assert writer.stats["dropped"] == 1  # counted, as close() promises, not lost silently


# --------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_on_pg(pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``mlflow server`` with the PostgreSQL backend store; the tiny model registered (champion) and served."""
    pytest.importorskip("keras")
    import mlflow

    from emassist.config.settings import params_from_dict
    from emassist.model import registry
    from emassist.model.tracking import setup_mlflow

    tmp = tmp_path_factory.mktemp("mlflow-pg")
    with (
        mlflow_tracking_server(tmp, backend_store_uri=pg.url("mlflow")) as tracking_uri,
        tracking_uri_env(tracking_uri),
    ):
        params = params_from_dict({
            "data": {"classes": CLASSES, "splits_dir": str(tmp / "splits")},
            "train": {"image_size": 32},
            "mlflow": {"tracking_uri": tracking_uri, "experiment": "pg-tests", "registered_model": MODEL_NAME},
        })  # fmt: skip
        model_file = brightness_model(tmp / "model.keras")
        setup_mlflow(params)
        with mlflow.start_run() as run:
            mlflow.log_metric("test_macro_f1", 0.9)
            mlflow.set_tags({"data_version": "dv-pg", "git_commit": "abc123", "model": "tiny"})
        mv = registry.log_and_register(params, run.info.run_id, model_file=model_file)
        registry.promote(MODEL_NAME, mv.version)
        with model_server(f"models:/{MODEL_NAME}@champion", tracking_uri, tmp) as url:
            yield {"url": url, "mv": mv, "run_id": run.info.run_id, "tracking_uri": tracking_uri}


def test_mlflow_registry_lives_in_postgres(pg: PostgresServer, mlflow_on_pg: dict[str, Any]) -> None:
    engine = sa.create_engine(pg.url("mlflow"))
    with engine.connect() as conn:
        versions = conn.execute(
            sa.text("SELECT version, run_id FROM model_versions WHERE name = :n"), {"n": MODEL_NAME}
        ).all()
        alias = conn.execute(
            sa.text("SELECT version FROM registered_model_aliases WHERE name = :n AND alias = 'champion'"),
            {"n": MODEL_NAME},
        ).scalar_one()
        status = conn.execute(
            sa.text("SELECT status FROM runs WHERE run_uuid = :r"), {"r": mlflow_on_pg["run_id"]}
        ).scalar_one()
    engine.dispose()
    assert [(str(v), r) for v, r in versions] == [(str(mlflow_on_pg["mv"].version), mlflow_on_pg["run_id"])]
    assert str(alias) == str(mlflow_on_pg["mv"].version)
    assert status == "FINISHED"


def test_model_registered_on_postgres_is_served(mlflow_on_pg: dict[str, Any]) -> None:
    """One request to `mlflow models serve` of the champion answers 200 with each class's probability, the same as
    the registered model loaded in-process through the PostgreSQL-backed registry."""
    import mlflow
    import numpy as np
    import requests

    images = [b64(image_bytes("png", seed=1, level=30)), b64(image_bytes("png", seed=2, level=225))]
    body = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
    response = requests.post(f"{mlflow_on_pg['url']}/invocations", json=body, timeout=120)
    assert response.status_code == 200, response.text[:500]
    served = pd.DataFrame(response.json()["predictions"])
    assert len(served) == 2 and (served["error"] == "").all()
    assert set(served["label"]) <= set(CLASSES)
    np.testing.assert_allclose(served[CLASSES].sum(axis=1), 1.0, atol=1e-5)
    local = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion").predict(pd.DataFrame({"image": images}))
    assert served["label"].tolist() == local["label"].tolist()
    np.testing.assert_allclose(served[CLASSES].to_numpy(float), local[CLASSES].to_numpy(float), rtol=1e-5, atol=1e-6)
