"""Shared fixtures. Heavy libraries are imported lazily by the tests that need them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_SEM_DIR = REPO_ROOT.parent / "shared" / "real_sem"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Prefect creates its home (settings, a local database) on first import: one per test session, removed at the end.
_PREFECT_HOME = tempfile.mkdtemp(prefix="emassist-tests-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def real_sem_dir() -> Path:
    """The real microscope files beside the checkout (../shared/real_sem); skip where absent."""
    if not REAL_SEM_DIR.is_dir():
        pytest.skip("../shared/real_sem is not present beside this checkout")
    return REAL_SEM_DIR
