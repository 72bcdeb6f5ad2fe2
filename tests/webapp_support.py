"""The web-page tests' champion: the session's small trained model (``small_model`` in tests/conftest.py, a
compact_cnn trained by the train stage on demo images of Fibres, Particles and Patterned_surface at 48 px), logged
into a run of a local sqlite MLflow store, registered and made champion; and ``emassist web`` as a real process
(its prediction log and corrected images in the champion's folder: :func:`monitoring_uri`, ``data/feedback``).

On a composite image (Fibres left, Particles right, :func:`composite`) its tile scores separate the halves.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers import REPO_ROOT, SMALL_CLASSES, SMALL_SPEC, SmallModel, demo_image, encode
from tests.servers import free_port, server_env, stop_process, tracking_uri_env, wait_http

__all__ = ["demo_image"]  # ws.demo_image: the tests render their images through this module too

SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"  # the browser tests' screenshots
CHROMIUM = Path("/usr/bin/chromium")  # Debian's (scripts/test.sh installs it); Playwright cannot download its own here


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Debian Chromium through Playwright (the screenshots folder made); skips the test where it is absent."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (scripts/test.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


LEFT, RIGHT = "Fibres", "Particles"
CLASSES = list(SMALL_CLASSES)  # the small model's classes, in its output order (LEFT and RIGHT among them)
MODEL_NAME = "sem-web-test"
IMAGE_SIZE = SMALL_SPEC["image_size"]
CACHE_SIZE = SMALL_SPEC["cache_size"]


@dataclass
class Champion:
    root: Path
    params_file: Path
    params: Any
    tracking_uri: str
    model_file: Path
    version: str


def composite(side: int = 256, index: int = 200) -> np.ndarray:
    """Left half LEFT, right half RIGHT: a ``2·side × 2·side`` image of four demo images."""
    left = np.concatenate([demo_image(LEFT, index, side), demo_image(LEFT, index + 1, side)], axis=0)
    right = np.concatenate([demo_image(RIGHT, index, side), demo_image(RIGHT, index + 1, side)], axis=0)
    return np.concatenate([left, right], axis=1)


def params_dict(root: Path, tracking_uri: str, **webapp: Any) -> dict[str, Any]:
    return {
        "data": {"classes": CLASSES, "splits_dir": str(root / "splits")},
        "ingest": {"cache_size": CACHE_SIZE, "min_side": 16},
        "train": {"model": "compact_cnn", "image_size": IMAGE_SIZE},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "webapp-tests", "registered_model": MODEL_NAME},
        "webapp": {"temp_dir": str(root / "webtmp"), "max_upload_bytes": 2_000_000, "max_pixels": 4_000_000,
                   "tile_size": 128, "tile_stride": 64, "low_confidence": 0.97, **webapp},
        # the page's prediction log and corrected images, in the test's folder
        "monitoring": {"db_uri": monitoring_uri(root), "feedback_dir": str(root / "data" / "feedback"),
                       "flush_interval_s": 0.2},
    }  # fmt: skip


def monitoring_uri(root: Path) -> str:
    """The prediction log of the page's tests (an SQLite file in the champion's folder)."""
    return f"sqlite:///{root / 'monitoring.db'}"


def register_champion(root: Path, small_model: SmallModel) -> Champion:
    """The small model's ``.keras`` file copied to ``root``, logged into a run of a local sqlite store (artifacts
    under ``root``), registered and promoted to champion."""
    import mlflow

    from emassist.config.settings import params_from_dict
    from emassist.model.registry import log_and_register, promote

    assert (small_model.classes, small_model.image_size, small_model.cache_size) == (CLASSES, IMAGE_SIZE, CACHE_SIZE)
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = params_dict(root, tracking_uri)
    params = params_from_dict(raw)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    model_file = small_model.copy_to(root)
    with tracking_uri_env(tracking_uri):
        mlflow.create_experiment("webapp-tests", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment("webapp-tests")
        with mlflow.start_run() as run:
            mlflow.set_tags({"data_version": "web-test", "model": "compact_cnn"})
        mv = log_and_register(params, run.info.run_id, model_file=model_file)
        promote(MODEL_NAME, mv.version, client=mlflow.MlflowClient())
    return Champion(root, params_file, params, tracking_uri, model_file, str(mv.version))


def write_params(champion: Champion, name: str, **webapp: Any) -> Path:
    raw = params_dict(champion.root, champion.tracking_uri, **webapp)
    path = champion.root / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextlib.contextmanager
def web_server(champion: Champion, params_file: Path | None = None, *extra: str) -> Iterator[str]:
    """``emassist web`` as a real process on 127.0.0.1 (cwd: the champion's folder); stopped with its group."""
    port = free_port()
    log_file = champion.root / f"web-{port}.log"
    cmd = [sys.executable, "-m", "emassist.cli.main", "--params", str(params_file or champion.params_file), "web",
           "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip
    env = server_env(MLFLOW_TRACKING_URI=champion.tracking_uri, PYTHONPATH=str(REPO_ROOT))
    env.pop("EMASSIST_MONITORING_DB_URI", None)  # the params file's log, not the caller's
    with open(log_file, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=champion.root,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/health", proc, log_file, timeout=180)
        yield url
    finally:
        stop_process(proc)


def png_file(path: Path, gray: np.ndarray) -> Path:
    path.write_bytes(encode(gray, "PNG"))
    return path
