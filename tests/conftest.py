"""Shared fixtures. Heavy libraries are imported lazily by the tests that need them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_SEM_DIR = REPO_ROOT.parent / "shared" / "real_sem"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture
def real_sem_dir() -> Path:
    """The real microscope files beside the checkout (../shared/real_sem); skip where absent."""
    if not REAL_SEM_DIR.is_dir():
        pytest.skip("../shared/real_sem is not present beside this checkout")
    return REAL_SEM_DIR
