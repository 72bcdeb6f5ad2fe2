"""tf.data input pipeline from the split CSVs: parallel decode, cache, shuffle, batch, prefetch.

A scale-aware model (``train.scale_input``) also gets each image's ``"scale"`` input: the pixel size of its model
input (:mod:`emassist.model.scale`), from the file's pixel size and width. Those are the split file's
``pixel_size_nm`` and ``width`` columns where it has them, else ingest's manifest (joined on ``sha256``; an
augmented copy on ``augmented_from``, the image it was made from: the offline zoom changes its field of view by at
most ``augment.policy.zoom``, ignored here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emassist.data.preprocess import to_model_input

log = logging.getLogger(__name__)

#: The manifest columns a scale-aware model's input is made from.
PIXEL_SIZE_COLUMNS = ("pixel_size_nm", "width")


class DatasetError(ValueError):
    """A split file is missing, empty, or names images/labels that do not exist."""


@dataclass(frozen=True)
class SplitData:
    name: str
    paths: list[str]
    labels: np.ndarray  # int class indices
    pixel_size_nm: np.ndarray | None = None  # float64 per image, NaN where unknown; None: not read
    source_width: np.ndarray | None = None  # the decoded file's width (pixels), NaN where unknown

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_known_pixel_sizes(self) -> int:
        if self.pixel_size_nm is None:
            return 0
        return int(np.isfinite(self.pixel_size_nm).sum())


def read_split(
    csv_path: Path, classes: Sequence[str], *, root: Path = Path("."), manifest: Path | None = None
) -> SplitData:
    """Read ``csv_path`` (columns ``image_path``, ``label``) and check it before any training starts.

    ``manifest``: also read each image's pixel size and width (for a scale-aware model): the split file's own
    ``pixel_size_nm`` / ``width`` columns, else those of the manifest (ingest's ``manifest.parquet``) joined on
    ``sha256`` (``augmented_from`` for augmented copies). An image the manifest does not know has an unknown size.
    """
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: split file not found (run `dvc repro split`)")
    frame = pd.read_csv(csv_path, keep_default_na=False)
    for column in ("image_path", "label"):
        if column not in frame.columns:
            raise DatasetError(f"{csv_path}: column '{column}' missing (found: {', '.join(frame.columns)})")
    if frame.empty:
        raise DatasetError(f"{csv_path}: the split is empty; check split ratios and that ingest accepted images")
    unknown = sorted(set(frame["label"]) - set(classes))
    if unknown:
        raise DatasetError(f"{csv_path}: unknown labels {unknown} (known: {', '.join(classes)})")
    paths = [str(root / p) for p in frame["image_path"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{csv_path}: {len(missing)} image(s) missing, e.g. {missing[0]} (re-run `dvc repro` or `dvc pull`)"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in frame["label"]], dtype=np.int32)
    if manifest is None:
        return SplitData(csv_path.stem, paths, labels)
    nm, width = _pixel_sizes(frame, csv_path, Path(manifest))
    return SplitData(csv_path.stem, paths, labels, nm, width)


def _floats(values: Any) -> np.ndarray:
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)


def _pixel_sizes(frame: pd.DataFrame, csv_path: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixel size nm, source width) per row of a split file; NaN where unknown."""
    if all(c in frame.columns for c in PIXEL_SIZE_COLUMNS):
        return _floats(frame["pixel_size_nm"]), _floats(frame["width"])
    nan = np.full(len(frame), math.nan)
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: the manifest is missing, so {csv_path} has no pixel sizes (run `dvc repro`)")
    table = pd.read_parquet(manifest)
    missing = [c for c in ("sha256", *PIXEL_SIZE_COLUMNS) if c not in table.columns]
    if missing:
        log.warning("%s has no column(s) %s: every pixel size of %s is unknown", manifest, missing, csv_path)
        return nan, nan.copy()
    if "sha256" not in frame.columns:
        raise DatasetError(f"{csv_path}: column 'sha256' missing: its pixel sizes cannot be looked up in {manifest}")
    table = table.drop_duplicates("sha256").set_index("sha256")
    keys = frame["sha256"].astype(str)
    if "augmented_from" in frame.columns:
        source = frame["augmented_from"].astype(str)
        keys = source.where(source != "", keys)
    nm = _floats(table["pixel_size_nm"].reindex(keys).to_numpy())
    width = _floats(table["width"].reindex(keys).to_numpy())
    return nm, width


def decode_cached_png(path: Any) -> Any:
    """Read one cached 8-bit grayscale PNG (ingest's output) as a uint8 ``[H, W, 1]`` tensor."""
    import tensorflow as tf

    return tf.io.decode_png(tf.io.read_file(path), channels=1)


def make_dataset(
    split: SplitData,
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    cache: bool = True,
    shuffle_buffer: int = 2048,
    seed: int = 42,
    augmentation: Any = None,
    scale: np.ndarray | None = None,
    scale_dropout: float = 0.0,
) -> Any:
    """Batches of ``(float32 [B, S, S, 3] in 0..255, int32 [B])``; augmentation only when ``training``.

    ``scale`` (a scale-aware model): float32 ``[N, 2]``, each image's ``"scale"`` input
    (:func:`emassist.model.scale.split_scale`); batches are then ``({"image": ..., "scale": [B, 2]}, y)``. When
    ``training``, each known size is masked as unknown with probability ``scale_dropout`` (drawn anew every epoch)."""
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    if scale is None:
        ds = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
        ds = ds.map(
            lambda p, y: (to_model_input(decode_cached_png(p), image_size), y),
            num_parallel_calls=autotune,
            deterministic=True,
        )
    else:
        if len(scale) != len(split):
            raise ValueError(f"{split.name}: {len(scale)} scale rows for {len(split)} images")
        ds = tf.data.Dataset.from_tensor_slices((split.paths, np.asarray(scale, np.float32), split.labels))
        ds = ds.map(
            lambda p, s, y: ({"image": to_model_input(decode_cached_png(p), image_size), "scale": s}, y),
            num_parallel_calls=autotune,
            deterministic=True,
        )
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(shuffle_buffer, len(split)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augmentation is not None:
        if scale is not None:
            ds = ds.map(lambda x, y: ({**x, "image": augmentation(x["image"], training=True)}, y),
                        num_parallel_calls=autotune)  # fmt: skip
        else:
            ds = ds.map(lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=autotune)
    if scale is not None and training and scale_dropout > 0:
        generator = tf.random.Generator.from_seed(seed + 1)

        def mask(x: dict[str, Any], y: Any) -> tuple[dict[str, Any], Any]:
            s = x["scale"]
            keep = tf.cast(generator.uniform((tf.shape(s)[0], 1)) >= scale_dropout, s.dtype)
            return {**x, "scale": s * keep}, y

        ds = ds.map(mask)  # sequential: the generator's state advances batch after batch
    return ds.prefetch(autotune)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights n / (k · count); classes absent from ``labels`` get weight 1."""
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    k = int(present.sum())
    return {i: (float(len(labels) / (k * counts[i])) if present[i] else 1.0) for i in range(num_classes)}
