"""The scoring server's prediction log, with real ``mlflow models serve`` processes on 127.0.0.1.

Two servers of the same saved pyfunc model start side by side: one with ``EMASSIST_PREDICTION_LOG`` on a writable
SQLite file (and the model's name/version/alias in the environment), one pointed at a path whose folder does not
exist (a store that cannot be opened; tests run as root, where a read-only folder would still take writes). Both
answer every request with 200; the first has logged every answered row once it is stopped (SIGTERM), the
second has said so once in its log. The first is stopped right after its last answer: SIGTERM makes its writer write
through (uvicorn's process runs no exit handlers), so no row of the last flush interval is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("mlflow")
pytest.importorskip("keras")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:An input example was not provided")]

from emassist.data.predlog import PredictionLog  # noqa: E402
from tests.helpers import BRIGHTNESS_CLASSES as CLASSES  # noqa: E402
from tests.helpers import VENV_BIN, b64, brightness_model, image_bytes  # noqa: E402
from tests.servers import free_port, server_env, start_process, stop_process, wait_http  # noqa: E402


def save_pyfunc(folder: Path, tmp: Path) -> Path:
    """The serving pyfunc of a tiny Keras model saved as a local MLflow model folder (no registry needed)."""
    import mlflow

    import emassist
    from emassist.config.settings import params_from_dict
    from emassist.model.registry import model_signature, pip_requirements, pyfunc_code_path, serving_config

    params = params_from_dict({"data": {"classes": CLASSES}, "train": {"image_size": 32},
                               "ingest": {"cache_size": 64, "max_pixels": 4_000_000, "min_side": 16}})  # fmt: skip
    model_file = brightness_model(tmp / "model.keras", conv=True)
    config_file = tmp / "serving_config.json"
    config_file.write_text(json.dumps(serving_config(params)))
    package = tmp / "code" / "emassist"
    shutil.copytree(Path(emassist.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(pyfunc_code_path()),
        artifacts={"keras_model": str(model_file), "config": str(config_file)},
        code_paths=[str(package)],
        signature=model_signature(CLASSES),
        pip_requirements=pip_requirements(),
    )
    return folder


@contextlib.contextmanager
def serving(model_dir: Path, tmp: Path, name: str, **env: str) -> Iterator[tuple[Any, str, Path]]:
    """``mlflow models serve`` started (not yet waited for): (process, url, log file)."""
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log_file = tmp / f"{name}.log"
    proc = start_process(cmd, log_file, server_env(**env))
    try:
        yield proc, f"http://127.0.0.1:{port}", log_file
    finally:
        stop_process(proc)


def stop_gracefully(proc: Any, timeout: float = 30.0) -> None:
    """SIGTERM to the server's process group, then wait until every process in it has exited: uvicorn shuts down
    and the interpreter runs its exit handlers (the writer's close). ``stop_process`` would SIGKILL the group as soon
    as the ``mlflow`` parent is gone, before uvicorn finished."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the server group {proc.pid} did not exit within {timeout:.0f} s of SIGTERM")


def _count(db: Path) -> int:
    try:
        return PredictionLog(f"sqlite:///{db}").count()
    except Exception:  # the server is creating the tables
        return 0


def post(url: str, values: list[str]) -> Any:
    body = {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}
    return requests.post(f"{url}/invocations", json=body, timeout=120)


def test_server_logs_answers_and_keeps_answering_when_the_store_is_down(tmp_path: Path) -> None:
    model_dir = save_pyfunc(tmp_path / "model", tmp_path)
    good_db = tmp_path / "logs" / "server.db"
    good_db.parent.mkdir()
    blobs = [image_bytes("png", seed=s, level=40 + 60 * s) for s in range(3)]
    with contextlib.ExitStack() as stack:
        logged_env = {"EMASSIST_PREDICTION_LOG": f"sqlite:///{good_db}", "EMASSIST_MODEL_NAME": "sem-classifier",
                      "EMASSIST_MODEL_VERSION": "4", "EMASSIST_MODEL_ALIAS": "champion",
                      "EMASSIST_PREDICTION_LOG_FLUSH_S": "3600"}  # fmt: skip  # only a stop (or 64 rows) writes
        good_proc, good_url, good_log = stack.enter_context(serving(model_dir, tmp_path, "logged", **logged_env))
        down_db = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'x.db'}"
        down_proc, down_url, down_log = stack.enter_context(
            serving(model_dir, tmp_path, "down", EMASSIST_PREDICTION_LOG=down_db)
        )
        wait_http(f"{good_url}/ping", good_proc, good_log)
        wait_http(f"{down_url}/ping", down_proc, down_log)
        answers: dict[str, list[Any]] = {"good": [], "down": []}
        for blob in blobs:
            for key, url in (("good", good_url), ("down", down_url)):
                r = post(url, [b64(blob)])
                assert r.status_code == 200, r.text[:500]
                answers[key].append(r.json()["predictions"][0])
        mixed = post(good_url, [b64(blobs[0]), "$$ not base64"])  # one bad row: answered, only the good one logged
        assert mixed.status_code == 200 and mixed.json()["predictions"][1]["error"]
        assert post(down_url, ["$$ not base64"]).status_code == 400  # a bad request stays a bad request
        # Stopped at once, within its flush interval of the last answer: uvicorn's process runs no atexit handlers,
        # so the rows are there only because SIGTERM switched the writer to write-through (its interval is an hour).
        stop_gracefully(good_proc)
        stop_gracefully(down_proc)
    assert [a["label"] for a in answers["good"]] == [a["label"] for a in answers["down"]]
    rows = PredictionLog(f"sqlite:///{good_db}").predictions()
    assert len(rows) == 4 and set(rows["source"]) == {"server"}
    expected = [hashlib.sha256(b).hexdigest() for b in (*blobs, blobs[0])]
    assert list(rows["sha256"]) == expected
    assert list(rows["label"]) == [a["label"] for a in answers["good"]] + [answers["good"][0]["label"]]
    assert set(rows["model_version"]) == {"4"} and set(rows["model_name"]) == {"sem-classifier"}
    assert set(rows["model_alias"]) == {"champion"} and set(rows["format"]) == {"PNG"}
    text = down_log.read_text(errors="replace")
    assert text.count("prediction log unavailable") == 1, text[-3000:]
