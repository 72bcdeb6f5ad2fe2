"""One home for the builders and fixtures' plumbing that several test files share.

* repository copies: :func:`tracked_files`, :func:`copy_repo`, :func:`tiny_params`, :func:`git_commit`
* image builders: :func:`png_header_only` (a decompression bomb's header), :func:`texture` (an SEM-like
  micrograph), :func:`image_bytes`, :func:`encode`,
  :func:`demo_image` (one demo SEM image rendered in memory), :func:`b64`
* models: :func:`brightness_model` (a hand-weighted tiny Keras model), the small *trained* model lives in
  ``tests/conftest.py`` (``small_model``, built by :func:`train_small_model`)
* :func:`models_cli` (the ``emassist`` model commands, in-process), :data:`POLICY` (an augmentation policy)

Nothing here imports TensorFlow, Keras or MLflow at module level: a unit test that needs none of them pays nothing.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# --------------------------------------------------------------------------------------------- repository copies

# Generated outputs of a pipeline run in the checkout: never copied into a test's repository.
OUTPUTS = ("data/", "dvc.lock", "models/", "reports/", "mlflow.db", "mlartifacts/", "bench/results")
GIT_IDENTITY = ("-c", "user.email=t@t", "-c", "user.name=t")


def tracked_files() -> list[str]:
    """The checkout's tracked and new (not ignored) files, less the generated outputs (:data:`OUTPUTS`)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    keep = ("data/feedback/README.md",)  # tracked under a data folder: the acquire stage's dep must exist in a copy
    return [line for line in out.splitlines() if line and (not line.startswith(OUTPUTS) or line in keep)]


def repo_params() -> dict[str, Any]:
    """The checkout's params.yaml as a dict (the defaults every test starts from)."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def patch_params(params: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``params`` with each section of ``overrides`` merged key by key into the same section (a new dict)."""
    out = {section: dict(values) if isinstance(values, Mapping) else values for section, values in params.items()}
    for section, values in overrides.items():
        out[section] = {**(out.get(section) or {}), **values}
    return out


def tiny_params(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The checkout's params.yaml patched section by section with ``overrides``."""
    return patch_params(repo_params(), overrides)


def git_commit(repo: Path, message: str) -> None:
    """``git add -A`` and commit everything in ``repo`` (a test's own repository) under a test identity."""
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *GIT_IDENTITY, "commit", "-qm", message], cwd=repo, check=True)


def dvc_config_local(repo: Path, key: str, value: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", key, value], cwd=repo, check=True)


def copy_repo(
    root: Path,
    *,
    params: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    dvc_remote: Path | None = None,
    site_cache: bool = False,
) -> Path:
    """A fresh copy of the repository at ``root``: its tracked and new files (no generated outputs), params.yaml
    replaced by ``params`` or patched with ``overrides``, committed as one commit of its own git repository.

    ``site_cache``: DVC's site cache inside the copy (``.dvc/site``), so that runs stay apart (DVC's default is
    ``/var/tmp/dvc``). ``dvc_remote``: a local DVC remote named ``local`` at that folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    for rel in tracked_files():
        src = REPO_ROOT / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    if params is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
    elif overrides:
        patched = patch_params(yaml.safe_load((root / "params.yaml").read_text()), overrides)
        (root / "params.yaml").write_text(yaml.safe_dump(patched, sort_keys=False))
    subprocess.run(["git", *GIT_IDENTITY, "init", "-q"], cwd=root, check=True)
    git_commit(root, "copy")
    if site_cache:
        site = root / ".dvc" / "site"
        site.mkdir(parents=True, exist_ok=True)
        dvc_config_local(root, "core.site_cache_dir", str(site))
    if dvc_remote is not None:
        dvc_config_local(root, "remote.local.url", str(dvc_remote))
    return root


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with the venv's bin first on PATH (``mlflow models serve`` and DVC need it)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def run_stage(stage: str, params_file: Path, cwd: Path, *, timeout: float = 900, log: Path | None = None,
              **env: str) -> str:  # fmt: skip
    """``python -m stages.<stage> --params FILE`` in ``cwd`` (the stable interface): its output (also written to
    ``log``), or a failed assertion with the output's tail. MLflow's URI comes from the params file unless ``env``
    sets ``MLFLOW_TRACKING_URI``."""
    base = {k: v for k, v in subprocess_env().items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", str(params_file)], cwd=cwd,
                          env={**base, **env}, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    out = done.stdout + done.stderr
    if log is not None:
        log.write_text(out)
    assert done.returncode == 0, f"stages.{stage} exited with {done.returncode}:\n{out[-5000:]}"
    return out


# --------------------------------------------------------------------------------------------- images


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` but carries (almost) no pixel data: a decompression bomb stand-in."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def encode(image: Any, fmt: str, **options: Any) -> bytes:
    """A PIL image or a NumPy array (uint8 / uint16 gray, uint8 RGB) as file bytes in ``fmt`` (PNG, TIFF, ...)."""
    from PIL import Image

    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def texture(h: int, w: int, seed: int = 0, mean: float = 120.0, noise: float = 18.0) -> np.ndarray:
    """An SEM-like micrograph (uint8 [h, w]): smooth random relief around ``mean`` plus pixel noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.0, (h // 8 + 1, w // 8 + 1))
    base = ((base - base.min()) / np.ptp(base) * 255).astype(np.uint8)
    relief = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    arr = relief * 0.5 + mean - 64 + rng.normal(0.0, noise, (h, w))
    return np.clip(arr, 0, 255).astype(np.uint8)


def image_bytes(kind: str, seed: int = 0, size: tuple[int, int] = (48, 40), level: int | None = None) -> bytes:
    """A small test image file: random pixels, or ``level`` ± 10 when given; ``kind`` png | jpeg | tiff16 | bmp."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h, w)) if level is None else np.full((h, w), level) + rng.integers(-10, 10, (h, w))
    buf = io.BytesIO()
    if kind == "png":
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "PNG")
    elif kind == "jpeg":
        rgb = np.stack([base, np.roll(base, 3, axis=1), base[::-1]], axis=-1)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    elif kind == "tiff16":
        Image.fromarray((np.clip(base, 0, 255) * 235).astype(np.uint16)).save(buf, "TIFF")
    elif kind == "bmp":
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "BMP")
    else:
        raise ValueError(kind)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def demo_params(**values: Any) -> Any:
    """Checked ``DemoParams`` (``emassist demo``'s settings) from keyword values over params.yaml's ``demo``."""
    from emassist.config.settings import params_from_dict

    return params_from_dict({"demo": values}).demo


def demo_float(cls: str, index: int, size: int = 128, seed: int = 7, *, databar: bool = False) -> np.ndarray:
    """One demo SEM image of class ``cls`` rendered in memory: float32 [size, size] in 0..1 (the generator's own)."""
    from emassist.config.classes import CLASSES as ALL
    from emassist.data.demo.generate import Job, render_image

    img, _ = render_image(Job("", ALL.index(cls), index, "x.png", databar, size, size, seed))
    return img


def demo_image(cls: str, index: int, size: int = 128, seed: int = 7, *, databar: bool = False) -> np.ndarray:
    """One demo SEM image (by default without a data bar) as uint8 grayscale, rendered in memory."""
    return (demo_float(cls, index, size, seed, databar=databar) * 255.0 + 0.5).astype(np.uint8)


def with_databar(gray: np.ndarray, seed: int = 0, share: float = 0.1) -> tuple[np.ndarray, int]:
    """``gray`` (uint8) with an instrument data bar (the demo generator's) APPENDED below it: (image, bar rows).

    The image itself is kept whole, so once the bar is cropped the two show exactly the same scene.
    """
    from emassist.data.demo.sem_look import draw_databar

    h, w = gray.shape
    total = round(h / (1.0 - share))
    canvas = np.full((total, w), np.nan, dtype=np.float32)  # the bar overwrites its rows; NaN marks the rest
    drawn = draw_databar(canvas, np.random.default_rng(seed))
    bar_rows = np.flatnonzero(np.isfinite(drawn).all(axis=1))
    bar = (drawn[bar_rows] * 255.0 + 0.5).astype(np.uint8)
    return np.concatenate([gray, bar], axis=0), len(bar_rows)


# --------------------------------------------------------------------------------------------- models

BRIGHTNESS_CLASSES = ["Fibres", "Particles", "Tips"]  # what brightness_model answers, darkest first


def brightness_model(path: Path, *, good: bool = True, conv: bool = False) -> Path:
    """A tiny Keras model on (32, 32, 3) 0..255 input: ``good`` classifies by mean brightness
    (dark → Fibres, mid → Particles, bright → Tips); otherwise it always says Fibres."""
    import keras

    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    if conv:
        x = keras.layers.Conv2D(3, 3, padding="same", kernel_initializer=keras.initializers.GlorotUniform(seed=1))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # Seeded like the convolution: the same model in every process (an unseeded Dense made the conv model's score
    # spread, and so tests that need tiles to score apart, differ from run to run).
    dense = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed=2))
    out = dense(x)
    model = keras.Model(inp, out)
    if not conv:
        w = np.zeros((3, 3), dtype=np.float32)
        if good:
            w[:, 0], w[:, 2] = -10.0 / 3, 10.0 / 3  # the same on each (equal) channel
            b = np.array([10.0 / 3, 0.0, -20.0 / 3], dtype=np.float32)
        else:
            b = np.array([5.0, 0.0, 0.0], dtype=np.float32)
        dense.set_weights([w, b])
    model.save(path)
    return path


@dataclass(frozen=True)
class SmallModel:
    """A small compact_cnn really trained (by the train stage) on demo images; see :func:`train_small_model`."""

    root: Path  # the training's working folder (data/, models/, mlflow.db, params.yaml)
    model_file: Path  # models/model.keras: the serving copy
    params_file: Path  # the params it was trained with (classes, sizes, ingest settings)
    params_raw: dict[str, Any]
    classes: list[str]
    image_size: int
    cache_size: int
    config: dict[str, Any]  # the pyfunc's serving config (emassist.model.registry.serving_config)
    tracking_uri: str  # the sqlite store holding the training run
    run_id: str
    seconds: float  # wall time of the train stage

    def classifier(self) -> Any:
        """The serving path in-process: ``SemClassifier.from_files`` (what ``mlflow models serve`` runs)."""
        from emassist.serve.pyfunc import SemClassifier

        return SemClassifier.from_files(self.model_file, self.config)

    def copy_to(self, folder: Path) -> Path:
        """A copy of the ``.keras`` file in ``folder`` (for a test that registers or moves it)."""
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(self.model_file, folder / self.model_file.name))


def small_model_to_json(model: SmallModel) -> str:
    """``model`` as JSON (paths as strings): how pytest-xdist workers hand one trained small model to each other."""
    fields = {name: getattr(model, name) for name in SmallModel.__dataclass_fields__}
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})


def small_model_from_json(text: str) -> SmallModel:
    """The inverse of :func:`small_model_to_json`."""
    raw = json.loads(text)
    paths = {name for name, f in SmallModel.__dataclass_fields__.items() if f.type in (Path, "Path")}
    return SmallModel(**{k: Path(v) if k in paths else v for k, v in raw.items()})


SMALL_CLASSES = ["Fibres", "Particles", "Patterned_surface"]  # three demo classes that look nothing alike
SMALL_TRAIN_SEED = 7  # demo seed of the training images; tests pick theirs with another seed
SMALL_SPEC: dict[str, Any] = {"image_size": 48, "cache_size": 64, "render_size": 128, "per_class": 64,
                              "val_per_class": 8, "test_per_class": 6, "epochs": 30,
                              "batch_size": 16}  # fmt: skip


def _write_split(rows: Sequence[tuple[str, str]], csv_path: Path) -> None:
    import pandas as pd

    csv_path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=["image_path", "label"])
    # The default model is scale-aware: these rendered images carry no tags and no data bar, so every pixel size is
    # unknown, as the served model will find it in the same images (the split file's own columns: no manifest).
    frame = frame.assign(pixel_size_nm="", width="")
    frame.to_csv(csv_path, index=False)


def train_small_model(
    root: Path, spec: Mapping[str, Any] = SMALL_SPEC, classes: Sequence[str] = SMALL_CLASSES
) -> SmallModel:
    """Render demo images (standardized as ingest caches them), write the split files and run the real train stage
    (``python -m stages.train``: tf.data, online flips and quarter turns, MLflow run in a sqlite store) in ``root``."""
    import time

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    images = root / "data" / "interim" / "images"
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    counts = {"train": spec["per_class"], "val": spec["val_per_class"], "test": spec["test_per_class"]}
    for cls in classes:
        (images / cls).mkdir(parents=True, exist_ok=True)
        index = 0
        for split, n in counts.items():
            for _ in range(n):
                gray = demo_image(cls, index, spec["render_size"], SMALL_TRAIN_SEED)
                # What ingest caches: no data bar here, so only the area-average (BOX) shrink to the cache size.
                side = spec["cache_size"]
                cached = Image.fromarray(gray).resize((side, side), Image.Resampling.BOX)
                rel = f"data/interim/images/{cls}/{index:03d}.png"
                (root / rel).write_bytes(encode(cached, "PNG"))
                rows[split].append((rel, cls))
                index += 1
    for split, split_rows in rows.items():
        _write_split(split_rows, root / "data" / "splits" / f"{split}.csv")
    # What training reads (the augment stage's output); no oversampling here: the classes are balanced.
    _write_split(rows["train"], root / "data" / "augmented" / "train.csv")

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = tiny_params(
        {
            "data": {"classes": list(classes), "splits_dir": "data/splits", "interim_dir": "data/interim",
                     "augmented_dir": "data/augmented"},
            "ingest": {"cache_size": spec["cache_size"], "min_side": 16, "workers": 1},
            "train": {"model": "compact_cnn", "image_size": spec["image_size"], "epochs": spec["epochs"],
                      "batch_size": spec["batch_size"], "learning_rate": 0.003, "early_stopping_patience": 100,
                      "weights": None, "finetune_epochs": 0, "work_pool": None, "seed": 0},
            "mlflow": {"tracking_uri": tracking_uri, "experiment": "small-model", "registered_model": "sem-small"},
        }
    )  # fmt: skip
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    run_stage("train", params_file, root, log=root / "train.log")
    seconds = time.perf_counter() - started
    run_id = json.loads((root / "models" / "run.json").read_text())["run_id"]

    from emassist.config.settings import params_from_dict
    from emassist.model.registry import serving_config

    config = serving_config(params_from_dict(raw))
    (root / "serving_config.json").write_text(json.dumps(config, indent=2))
    return SmallModel(root=root, model_file=root / "models" / "model.keras", params_file=params_file, params_raw=raw,
                      classes=list(classes), image_size=spec["image_size"], cache_size=spec["cache_size"],
                      config=config, tracking_uri=tracking_uri, run_id=run_id, seconds=seconds)  # fmt: skip


def models_cli(params_file: Path, *argv: str) -> int:
    """The ``emassist`` model commands (predict, promote, rollback, models ...) in-process; their exit code."""
    from emassist.cli.models import add_commands

    parser = argparse.ArgumentParser(prog="emassist")
    parser.add_argument("--params", type=Path, default=params_file)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


# --------------------------------------------------------------------------------------------- settings

POLICY: dict[str, float | bool] = {  # an offline augmentation policy with every transform on
    "rotation": 0.1,
    "width_shift": 0.1,
    "height_shift": 0.1,
    "shear": 0.1,
    "zoom": 0.1,
    "flip": True,
    "brightness": 0.1,
    "contrast": 0.1,
}
