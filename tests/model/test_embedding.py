"""Backbone embeddings from a local weights file, their errors, and the split step with split.embedding on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from emassist.config.settings import ParamsError, load_params
from emassist.data.hashing import dhash
from emassist.model.embedding import EmbeddingError, build_backbone, check_backbone, embed_images
from emassist.pipeline import split as split_step
from emassist.pipeline.stagerun import StageError
from tests.helpers import texture, tiny_params

SIZE = 32  # MobileNetV2's smallest input: a fast forward pass on CPU


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A random (weights=None) MobileNetV2 backbone saved with save_weights (what split.embedding points at), and
    the model itself."""
    import keras

    keras.utils.set_random_seed(0)
    model = build_backbone("mobilenet_v2", SIZE, None)
    path = tmp_path_factory.mktemp("backbone") / "mobilenet_v2.weights.h5"
    model.save_weights(path)
    return path, model


@pytest.fixture(scope="module")
def weights_file(backbone: tuple[Path, Any]) -> Path:
    return backbone[0]


def _images(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(texture(48, 48, seed=i)).save(paths[-1])
    return paths


def test_embeddings_from_a_weights_file_match_the_saved_model(backbone: tuple[Path, Any], tmp_path: Path) -> None:
    weights_file, saved = backbone
    paths = _images(tmp_path, 5)
    # A copy of image 0 under another name: the same pixels, the same features.
    Image.open(paths[0]).save(tmp_path / "copy.png")
    paths.append(tmp_path / "copy.png")
    emb = embed_images(paths, backbone="mobilenet_v2", weights=weights_file, image_size=SIZE, batch_size=4)
    assert emb.shape == (6, 1280) and emb.dtype == np.float32 and np.isfinite(emb).all()
    u = _unit(emb)  # a random backbone's features are tiny (~1e-12): compare directions
    assert u[5] @ u[0] > 0.99999  # the same pixels, the same features
    assert u[1] @ u[2] < 0.999  # other images, other features
    # The file's weights were loaded: the features are the saved model's (a fresh random backbone's are not).
    reference = _unit(embed_images(paths, backbone="mobilenet_v2", weights=None, image_size=SIZE, model=saved))
    np.testing.assert_allclose(u, reference, atol=1e-4)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bad_backbone_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match=r"split\.embedding: weights file .*nope\.weights\.h5.* does not exist"):
        build_backbone("mobilenet_v2", SIZE, tmp_path / "nope.weights.h5")
    with pytest.raises(ValueError, match=r"split\.embedding_image_size: xception needs at least 71 px"):
        check_backbone("xception", 64)
    with pytest.raises(ValueError, match=r"split\.embedding_backbone"):
        check_backbone("resnet", 224)
    wrong = tmp_path / "wrong.weights.h5"
    wrong.write_bytes(b"not hdf5")
    with pytest.raises(EmbeddingError, match=r"loading .*wrong\.weights\.h5"):
        build_backbone("mobilenet_v2", SIZE, wrong)


def _interim(root: Path, n: int) -> None:
    """A tiny ingest output: cached PNGs and a manifest, with a flipped copy of every fifth image."""
    images = root / "data/interim/images"
    images.mkdir(parents=True)
    rows = []
    for i in range(n):
        label = "Particles" if i % 2 else "Fibres"
        g = texture(48, 48, seed=100 + i)
        for kind, img in [("img", g)] + ([("flip", np.ascontiguousarray(g[:, ::-1]))] if i % 5 == 0 else []):
            sha = f"{len(rows):064x}"
            Image.fromarray(img).save(images / f"{sha}.png")
            rows.append((sha, f"{label}/{kind}_{i}.png", label, f"images/{sha}.png", dhash(img)))
    pd.DataFrame(rows, columns=["sha256", "source_path", "label", "image_path", "dhash"]).to_parquet(
        root / "data/interim/manifest.parquet"
    )


def test_split_step_with_embeddings_writes_the_audit(
    weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _interim(tmp_path, 40)
    params_file = tmp_path / "params.yaml"
    overrides = {"split": {"embedding": str(weights_file), "embedding_backbone": "mobilenet_v2",
                           "embedding_image_size": SIZE, "embedding_threshold": 0.9999}}  # fmt: skip
    params_file.write_text(yaml.safe_dump(tiny_params(overrides)))
    monkeypatch.chdir(tmp_path)
    split_step.main(load_params(params_file))
    report = json.loads(Path("reports/split.json").read_text())
    assert set(report["linked_pairs"]) == {"sha256", "dhash", "dihedral", "embedding"}
    assert report["linked_pairs"]["dihedral"] >= 8  # the flipped copies
    leakage = report["leakage"]
    assert leakage["share_with_near_duplicate_in_train"]["ours"] == {
        "dhash": 0.0, "dihedral": 0.0, "embedding": 0.0, "any": 0.0
    }  # fmt: skip
    assert all("cosine" in row and "nearest_train_embedding" in row for row in leakage["nearest_train"])
    assert Path("reports/plots/leakage.png").stat().st_size > 1000
    assert list(pd.read_csv("reports/plots/leakage.csv").columns) == ["distance", "our_split", "random_split"]
    out = capsys.readouterr().out
    assert "leakage audit" in out and "cosine >= 0.9999" in out


def test_split_step_refuses_a_too_small_xception_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params_file = tmp_path / "params.yaml"
    overrides = {"split": {"embedding": "imagenet", "embedding_backbone": "xception", "embedding_image_size": 64}}
    params_file.write_text(yaml.safe_dump(tiny_params(overrides)))
    monkeypatch.chdir(tmp_path)  # no data/interim here: the check must come first
    # refused when the params load, naming the key (the split step's own check stays for values set in code)
    with pytest.raises(ParamsError, match=r"split\.embedding_image_size: xception needs at least 71 pixels"):
        load_params(params_file)
    # values set in code (not through params.yaml) meet the split step's own check, still before any work
    good = params_file.with_name("good.yaml")
    good.write_text(yaml.safe_dump(tiny_params({"split": {"embedding": "imagenet", "embedding_backbone": "mobilenet_v2",
                                                          "embedding_image_size": 64}})))  # fmt: skip
    params = load_params(good)
    small = dataclasses.replace(params, split=dataclasses.replace(params.split, embedding_backbone="xception"))
    with pytest.raises(StageError, match="xception needs at least 71 px"):
        split_step.main(small)
