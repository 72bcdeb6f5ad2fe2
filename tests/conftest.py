"""Shared fixtures. Heavy libraries are imported lazily by the tests that need them.

Tests live in layers (folders), each also a marker applied here: ``code`` (unit), ``data`` (data invariants),
``model`` (behaviour of a small trained model), ``system`` (real servers as processes, the DVC pipeline); e.g.
``pytest -m "not system"``. Builders shared by several files are in tests/helpers.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, SmallModel, small_model_from_json, small_model_to_json, train_small_model

__all__ = ["REAL_SEM_DIR", "REPO_ROOT"]

REAL_SEM_DIR = REPO_ROOT.parent / "shared" / "real_sem"
LAYERS = ("code", "data", "model", "system")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    import __main__

    # An xdist worker's __main__ is execnet's `python -c` bootstrap: no __file__, no __spec__. pyspark.sql.connect
    # (imported by Great Expectations) takes that for a doctest run and calls sys.exit(0) when its gRPC extras are
    # missing. Give it a file: this folder's empty __init__.py (also harmless if a forkserver re-imports it).
    if getattr(__main__, "__spec__", None) is None and not hasattr(__main__, "__file__"):
        __main__.__file__ = str(Path(__file__).with_name("__init__.py"))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Prefect creates its home (settings, a local database) on first import: one per test session, removed at the end.
# Under pytest-xdist every worker has its own: a worker inherits the controller's environment, so a value this file
# set in the controller (named by _SESSION_HOME_VAR) is replaced, while one the user set is kept.
_SESSION_HOME_VAR = "EMASSIST_TESTS_SESSION_HOME"
_PREFECT_HOME = tempfile.mkdtemp(prefix="emassist-tests-prefect-")
_INHERITED_HOME = os.environ.get(_SESSION_HOME_VAR)


def _session_default(key: str, value: str) -> None:
    current = os.environ.get(key)
    if current is None or (_INHERITED_HOME and _INHERITED_HOME in current):
        os.environ[key] = value


_session_default("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The prediction log of every command a test runs (emassist predict / scan / web): one session file, never the
# working directory's monitoring.db. Tests that check the log point it elsewhere themselves.
_session_default("EMASSIST_MONITORING_DB_URI", f"sqlite:///{Path(_PREFECT_HOME) / 'monitoring.db'}")
os.environ[_SESSION_HOME_VAR] = _PREFECT_HOME


#: Under pytest-xdist (scripts/test.sh: ``-n 2 --dist loadfile``) whole files are handed to the workers in
#: collection order, each worker taking the next when it runs dry. These files (most of the suite's time: real servers,
#: DVC and Prefect runs, training) are collected first, longest first, so that the workers finish together instead
#: of one starting a minute-long file while the other is done (seconds per file from a 2-worker run: 170 down to
#: 15). A serial run keeps the folders' order. A file missing here only runs later; a name here that is gone is ignored.
HEAVY_FIRST = (
    "system/test_s3_pipeline.py",
    "system/test_pipeline_dvc.py",
    "system/test_prefect_orchestration.py",
    "system/test_xception.py",
    "system/test_webapp.py",
    "system/test_spark_batch.py",
    "code/test_training.py",
    "system/test_prefect_local.py",
    "code/test_scale_input.py",
    "system/test_prefect_monitor.py",
    "code/test_models.py",
    "system/test_webapp_startup.py",
    "system/test_registry.py",
    "system/test_watch.py",
    "system/test_postgres.py",
    "system/test_watch_live.py",
    "system/test_serving.py",
    "data/test_feedback.py",
    "system/test_predlog_server.py",
    "system/test_serving_scale.py",
    "data/test_pixelsize.py",
    "code/test_monitor_cli.py",
    "model/test_embedding.py",
    "model/test_behaviour.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its layer: the folder under tests/ it lives in. Under xdist, :data:`HEAVY_FIRST` first."""
    tests_dir = REPO_ROOT / "tests"
    where: dict[str, str] = {}
    for item in items:
        try:
            rel = Path(str(item.path)).resolve().relative_to(tests_dir)
        except ValueError:
            continue
        where[item.nodeid] = rel.as_posix()
        if rel.parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, rel.parts[0]))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
        items.sort(key=lambda item: rank.get(where.get(item.nodeid, ""), len(rank)))  # stable: the rest in order


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def real_sem_dir() -> Path:
    """The real microscope files beside the checkout (../shared/real_sem); skip where absent."""
    if not REAL_SEM_DIR.is_dir():
        pytest.skip("../shared/real_sem is not present beside this checkout")
    return REAL_SEM_DIR


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> SmallModel:
    """A small compact_cnn trained ONCE per test run by the real train stage on demo images of three classes
    (Fibres, Particles, Patterned_surface; 48 px; online flips and quarter turns; about 35 s on two cores).
    Under pytest-xdist the first worker that needs it trains it in the run's shared temp folder while the others
    wait on a file lock, then all read the same files.

    Its folder holds models/model.keras, params.yaml, serving_config.json, the split files and cached PNGs, and
    the sqlite MLflow store with the training run. Treat it as read-only: copy the model file before changing it
    (``small_model.copy_to(folder)``)."""
    pytest.importorskip("keras")
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: no xdist, -n 0 or -p no:xdist
        return train_small_model(tmp_path_factory.mktemp("small-model"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the run's folder: each worker's basetemp lies in it
    done = shared / "small-model.json"
    with FileLock(str(shared / "small-model.lock")):
        if done.is_file():
            return small_model_from_json(done.read_text())
        root = shared / "small-model"
        shutil.rmtree(root, ignore_errors=True)  # what a worker that failed to train left
        model = train_small_model(root)
        done.write_text(small_model_to_json(model))
        return model
