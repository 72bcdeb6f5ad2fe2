"""tf.data input pipeline from the split CSVs: parallel decode, cache, shuffle, batch, prefetch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emassist.data.preprocess import to_model_input


class DatasetError(ValueError):
    """A split file is missing, empty, or names images/labels that do not exist."""


@dataclass(frozen=True)
class SplitData:
    name: str
    paths: list[str]
    labels: np.ndarray  # int class indices

    def __len__(self) -> int:
        return len(self.paths)


def read_split(csv_path: Path, classes: Sequence[str], *, root: Path = Path(".")) -> SplitData:
    """Read ``csv_path`` (columns ``image_path``, ``label``) and check it before any training starts."""
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
    return SplitData(csv_path.stem, paths, labels)


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
) -> Any:
    """Batches of ``(float32 [B, S, S, 3] in 0..255, int32 [B])``; augmentation only when ``training``."""
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
    ds = ds.map(
        lambda p, y: (to_model_input(decode_cached_png(p), image_size), y),
        num_parallel_calls=autotune,
        deterministic=True,
    )
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(shuffle_buffer, len(split)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augmentation is not None:
        ds = ds.map(lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights n / (k · count); classes absent from ``labels`` get weight 1."""
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    k = int(present.sum())
    return {i: (float(len(labels) / (k * counts[i])) if present[i] else 1.0) for i in range(num_classes)}
