"""The user's own model end to end, at tiny scale: Xception trained in both phases (head, then the top block(s)
fine-tuned) at 71 px on a few demo images, its base weights loaded from a LOCAL file (as on a machine with no
route to the ImageNet weights host), evaluated, registered through the gate, served by a real
``mlflow models serve`` process, and explained (Grad-CAM) by the real web page process.

Everything runs through the stable interfaces: ``python -m stages.<name> --params FILE`` in a working folder,
``mlflow models serve``, ``emassist web``.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from tests import webapp_support as ws
from tests.helpers import b64, demo_image, encode, run_stage, tiny_params
from tests.servers import model_server, tracking_uri_env

pytestmark = pytest.mark.slow

CLASSES = ["Fibres", "Particles"]
MODEL_NAME = "sem-xception-test"
IMAGE_SIZE = 71  # the smallest Xception accepts
CACHE_SIZE = 80
COUNTS = {"train": 4, "val": 2, "test": 2}  # per class
BASE_SEED = 123  # of the local base weights: differs from training's, so a loaded file is recognisable


@dataclass
class Trained:
    root: Path
    params_file: Path
    params_raw: dict[str, Any]
    tracking_uri: str
    weights_file: Path
    registry: dict[str, Any]
    outputs: dict[str, str]


def _write_data(root: Path) -> None:
    import pandas as pd
    from PIL import Image

    index = 0
    for split, n in COUNTS.items():
        rows = []
        for cls in CLASSES:
            (root / "data/interim/images" / cls).mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                gray = Image.fromarray(demo_image(cls, index, 128, seed=11))
                rel = f"data/interim/images/{cls}/{index:03d}.png"
                gray.resize((CACHE_SIZE, CACHE_SIZE), Image.Resampling.BOX).save(root / rel)  # as ingest caches
                # the default model is scale-aware: a pixel size per class (of the 128 px render), as ingest records it
                rows.append((rel, cls, 10.0 * (1 + CLASSES.index(cls)), 128))
                index += 1
        frame = pd.DataFrame(rows, columns=["image_path", "label", "pixel_size_nm", "width"])
        for folder in ("data/splits", *(["data/augmented"] if split == "train" else [])):
            (root / folder).mkdir(parents=True, exist_ok=True)
            frame.to_csv(root / folder / f"{split}.csv", index=False)


def _base_weights(path: Path) -> Path:
    """A local weights file of the Xception base (include_top=False, average pooling), as the ImageNet one
    would be copied to an offline machine; random here, from its own seed."""
    import keras

    keras.utils.set_random_seed(BASE_SEED)
    base = keras.applications.Xception(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), pooling="avg"
    )
    base.save_weights(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """train (both phases) → evaluate → register, each as its stage command, in a working folder."""
    import mlflow

    root = tmp_path_factory.mktemp("xception")
    (root / "tmp").mkdir()
    weights = _base_weights(root / "tmp" / "xception_base.weights.h5")
    _write_data(root)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = tiny_params(
        {
            "data": {"classes": CLASSES, "splits_dir": "data/splits", "interim_dir": "data/interim",
                     "augmented_dir": "data/augmented"},
            "ingest": {"cache_size": CACHE_SIZE, "min_side": 16, "workers": 1},
            "train": {"model": "xception", "image_size": IMAGE_SIZE, "weights": str(weights), "epochs": 1,
                      "finetune_epochs": 1, "finetune_blocks": 1, "batch_size": 4, "work_pool": None},
            "mlflow": {"tracking_uri": tracking_uri, "experiment": "xception-test", "registered_model": MODEL_NAME},
            "webapp": {"source": "registry", "alias": "champion", "temp_dir": str(root / "webtmp"),
                       "max_upload_bytes": 2_000_000, "max_pixels": 4_000_000},
        }
    )  # fmt: skip
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    with tracking_uri_env(tracking_uri):  # artifacts in the working folder, wherever a stage runs from
        mlflow.create_experiment("xception-test", artifact_location=(root / "artifacts").as_uri())
    outputs = {stage: run_stage(stage, params_file, root, log=root / f"{stage}.log", timeout=1200)
               for stage in ("train", "evaluate", "register")}  # fmt: skip
    registry = json.loads((root / "reports" / "registry.json").read_text())
    return Trained(root, params_file, raw, tracking_uri, weights, registry, outputs)


def test_trains_both_phases_from_the_local_weights_file(trained: Trained) -> None:
    import keras

    history = json.loads((trained.root / "models" / "history.json").read_text())
    assert len(history["history"]["loss"]) == 2  # one epoch per phase
    assert history["phase_boundaries"] == [1]  # the fine-tuning phase started after the first epoch
    model = keras.models.load_model(trained.root / "models" / "model.keras", compile=False)
    assert model.inputs[0].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert model.outputs[0].shape[-1] == len(CLASSES)
    # The lowest block stays frozen in both phases: it still holds exactly the weights of the local file.
    file_base = keras.applications.Xception(
        include_top=False, weights=str(trained.weights_file), input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), pooling="avg"
    )
    trained_conv = model.get_layer("xception_base").get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_array_equal(trained_conv, file_base.get_layer("block1_conv1").get_weights()[0])
    keras.utils.set_random_seed(BASE_SEED + 1)  # a fresh random base differs: the equality above means something
    other = keras.applications.Xception(include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    assert not np.array_equal(trained_conv, other.get_layer("block1_conv1").get_weights()[0])
    metrics = json.loads((trained.root / "reports" / "metrics.json").read_text())
    assert metrics["n"] == COUNTS["test"] * len(CLASSES) and 0.0 <= metrics["macro_f1"] <= 1.0


def test_registered_through_the_gate_as_champion(trained: Trained) -> None:
    import mlflow

    reg = trained.registry
    assert reg["name"] == MODEL_NAME and reg["version"] == "1"
    assert reg["decision"] == "promoted" and "champion" in reg["aliases"]
    with tracking_uri_env(trained.tracking_uri):
        client = mlflow.MlflowClient()
        mv = client.get_model_version_by_alias(MODEL_NAME, "champion")
        assert str(mv.version) == "1"
        assert mv.tags.get("model") == "xception"
        assert mv.tags.get("gate_decision") == "promoted"


@pytest.fixture(scope="module")
def image_png() -> bytes:
    return encode(demo_image("Particles", 500, 160, seed=99), "PNG")


def test_served_by_mlflow_models_serve(trained: Trained, image_png: bytes) -> None:
    with model_server(f"models:/{MODEL_NAME}@champion", trained.tracking_uri, trained.root) as url:
        body = {"dataframe_split": {"columns": ["image"], "data": [[b64(image_png)]]}}
        resp = requests.post(f"{url}/invocations", json=body, timeout=300)
    assert resp.status_code == 200, resp.text[:1000]
    row = resp.json()["predictions"][0]
    assert row["label"] in CLASSES and row["error"] == ""
    assert sum(row[c] for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
    assert row["confidence"] == pytest.approx(max(row[c] for c in CLASSES), abs=1e-6)


@pytest.fixture(scope="module")
def web(trained: Trained) -> Iterator[str]:
    from emassist.config.settings import params_from_dict

    champion = ws.Champion(
        root=trained.root,
        params_file=trained.params_file,
        params=params_from_dict(trained.params_raw),
        tracking_uri=trained.tracking_uri,
        model_file=trained.root / "models" / "model.keras",
        version=trained.registry["version"],
    )
    with ws.web_server(champion) as url:
        yield url


def test_web_page_classifies_and_draws_a_grad_cam(web: str, image_png: bytes) -> None:
    from PIL import Image

    info = requests.get(f"{web}/api/info", timeout=30).json()
    assert info["model"]["name"] == MODEL_NAME and info["model"]["version"] == "1"
    assert info["classes"] == CLASSES
    r = requests.post(f"{web}/api/classify", params={"filename": "particles.png"}, data=image_png, timeout=300)
    assert r.status_code == 200, r.text[:1000]
    result = r.json()
    assert result["label"] in CLASSES
    for cls in CLASSES:
        g = requests.get(f"{web}/api/gradcam/{result['id']}", params={"class": cls}, timeout=300)
        assert g.status_code == 200, g.text[:1000]
        cam = g.json()
        assert cam["class"] == cls
        assert cam["layer"].startswith("xception_base/")  # the last feature map inside the nested backbone
        prefix = "data:image/png;base64,"
        assert cam["overlay"].startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(cam["overlay"][len(prefix) :]))) as im:
            assert im.width > 0 and im.height > 0 and im.mode in ("RGB", "RGBA")
