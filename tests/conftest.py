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

from tests.helpers import REPO_ROOT, SmallModel, train_small_model

__all__ = ["REAL_SEM_DIR", "REPO_ROOT"]

REAL_SEM_DIR = REPO_ROOT.parent / "shared" / "real_sem"
LAYERS = ("code", "data", "model", "system")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Prefect creates its home (settings, a local database) on first import: one per test session, removed at the end.
_PREFECT_HOME = tempfile.mkdtemp(prefix="emassist-tests-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The prediction log of every command a test runs (emassist predict / scan / web): one session file, never the
# working directory's monitoring.db. Tests that check the log point it elsewhere themselves.
os.environ.setdefault("EMASSIST_MONITORING_DB_URI", f"sqlite:///{Path(_PREFECT_HOME) / 'monitoring.db'}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its layer: the folder under tests/ it lives in."""
    tests_dir = REPO_ROOT / "tests"
    for item in items:
        try:
            layer = Path(str(item.path)).resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


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
    """A small compact_cnn trained ONCE per session by the real train stage on demo images of three classes
    (Fibres, Particles, Patterned_surface; 48 px; online flips and quarter turns; about 35 s on two cores).

    Its folder holds models/model.keras, params.yaml, serving_config.json, the split files and cached PNGs, and
    the sqlite MLflow store with the training run. Treat it as read-only: copy the model file before changing it
    (``small_model.copy_to(folder)``)."""
    pytest.importorskip("keras")
    return train_small_model(tmp_path_factory.mktemp("small-model"))
