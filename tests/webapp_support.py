"""A small real champion for the web-page tests: compact_cnn trained on demo images of two distinct classes.

Fibres (long smooth strands) and Particles (round blobs) rendered by the demo generator in memory, 48 px,
12 epochs: about 25 s on two cores, held-out accuracy ≈ 0.9, and on a composite image (Fibres left, Particles
right) its tile scores separate the halves cleanly. Registered in a local sqlite MLflow store and made champion.
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
import yaml

from tests.servers import free_port, server_env, stop_process, tracking_uri_env, wait_http

LEFT, RIGHT = "Fibres", "Particles"
CLASSES = [LEFT, RIGHT]
MODEL_NAME = "sem-web-test"
IMAGE_SIZE = 48
CACHE_SIZE = 64
N_PER_CLASS = 60
EPOCHS = 12


@dataclass
class Champion:
    root: Path
    params_file: Path
    params: Any
    tracking_uri: str
    model_file: Path
    version: str


def demo_image(cls: str, index: int, size: int = 128, seed: int = 7) -> np.ndarray:
    """One demo SEM image (no data bar) as uint8 grayscale, rendered in memory."""
    from emassist.config.classes import CLASSES as ALL
    from emassist.data.demo.generate import Job, render_image

    img, _ = render_image(Job("", ALL.index(cls), index, "x.png", False, size, size, seed))
    return (img * 255.0 + 0.5).astype(np.uint8)


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
    }  # fmt: skip


def train_model(path: Path) -> Path:
    import keras

    from emassist.data.preprocess import Preprocessor
    from emassist.model.builders import build_model
    from emassist.model.phases import compile_model
    from emassist.model.saving import save_serving_copy

    pre = Preprocessor(CACHE_SIZE, crop_databar=False, max_pixels=10**8, min_side=16, image_size=IMAGE_SIZE)
    images, labels = [], []
    for i in range(N_PER_CLASS):
        for k, cls in enumerate(CLASSES):
            images.append(pre.standardize(demo_image(cls, i))[0])
            labels.append(k)
    keras.utils.set_random_seed(0)
    model = build_model("compact_cnn", num_classes=len(CLASSES), image_size=IMAGE_SIZE)
    compile_model(model, optimizer="adam", learning_rate=2e-3)
    x = np.asarray(pre.to_model_input(np.stack(images)[..., None]))
    model.fit(x, np.array(labels), epochs=EPOCHS, batch_size=16, verbose=0)
    return save_serving_copy(model, path)


def register_champion(root: Path) -> Champion:
    """Train, log into a run of a local sqlite store (artifacts under ``root``), register, promote to champion."""
    import mlflow

    from emassist.config.settings import params_from_dict
    from emassist.model.registry import log_and_register, promote

    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = params_dict(root, tracking_uri)
    params = params_from_dict(raw)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    model_file = train_model(root / "model.keras")
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
    env = server_env(MLFLOW_TRACKING_URI=champion.tracking_uri, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
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
    from PIL import Image

    Image.fromarray(gray).save(path, format="PNG")
    return path
