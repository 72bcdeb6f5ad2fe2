"""Needle in a haystack: classify overlapping tiles of a large overview image and map one class's score over it.

The overview is decoded once and its data bar cropped once, by the model's own
:class:`~emassist.data.preprocess.Preprocessor`; that image is cut into ``tile``×``tile`` windows every ``stride``
pixels (the last row and column are moved in to touch the edge, so every pixel is covered), each resized to the
cache size by :meth:`Preprocessor.tiles` (no data-bar search of its own; a plain copy when the tile is the cache
size), and the tiles go through the model in batches (in-process, or to the endpoint as already-standardized images),
the next batch cut on a second thread while the model runs the current one. The result is a per-class score grid
``[rows, cols, classes]``; :func:`heatmap` spreads one class's scores back over the pixels (the mean over the
tiles covering each pixel).

A scale-aware model (:mod:`emassist.model.scale`) gets every tile's pixel size: the full image's (``scale``: from
the caller, its tags or its data bar), scaled to the tile's model input (the tile's width over the model's input
side, where a whole image takes the image's width): ``predict(tiles, scale)`` with the same ``"scale"`` row for each.

A featureless overview (a blank frame: :meth:`Preprocessor.check_features` on the whole cropped image) is refused with
``ImageRejected``; flat tiles inside a real overview (a bare substrate, a background region) are scored like any other.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from emassist.config.settings import ParamsError, check_tiling
from emassist.core.atomic import atomic_path
from emassist.data.preprocess import Preprocessor
from emassist.model.scale import ScaleUsed, model_input_pixel_size_nm, scale_features
from emassist.serve.drawing import overlay, png_bytes

#: standardized uint8 tiles ``[B, S, S]`` (and, for a scale-aware model, their float32 ``[B, 2]`` scale input)
#: → probabilities ``[B, n_classes]``
PredictFn = Callable[..., np.ndarray]

#: the heat map is computed on a grid no larger than this on its longer side
HEAT_MAX_SIDE = 1024


class ScanError(ValueError):
    """Bad tile-scan options (the message names the option)."""


@dataclass
class TileScan:
    classes: list[str]
    scores: np.ndarray  # float32 [rows, cols, n_classes]
    xs: list[int]  # left edge of each tile column
    ys: list[int]  # top edge of each tile row
    tile: int  # side of a tile in image pixels (clipped to the image)
    stride: int
    height: int  # of the scanned area (data bar cropped)
    width: int
    databar_rows: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    pixel_size_nm: float | None = None  # of the full image (None: unknown, or a model without the scale input)
    tile_pixel_size_nm: float | None = None  # of each tile's model input
    pixel_size_source: str = ""  # request | tags | databar_scalebar | databar_mag | unknown; "": not used

    @property
    def n_tiles(self) -> int:
        return len(self.xs) * len(self.ys)

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise ScanError(f"unknown class {name!r} (the model knows: {', '.join(self.classes)})")
        return self.classes.index(name)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per tile: row, col, x, y, width, height, label, then one score per class."""
        out = []
        for r, y in enumerate(self.ys):
            for c, x in enumerate(self.xs):
                p = self.scores[r, c]
                row: dict[str, Any] = {"row": r, "col": c, "x": x, "y": y, "width": self.tile, "height": self.tile}
                row["label"] = self.classes[int(np.argmax(p))]
                row.update({name: round(float(p[k]), 6) for k, name in enumerate(self.classes)})
                out.append(row)
        return out

    def csv_text(self) -> str:
        buf = io.StringIO()
        fields = ["row", "col", "x", "y", "width", "height", "label", *self.classes]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buf.getvalue()


def positions(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride``, the last moved in to end at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def check_options(tile: int, stride: int, max_tiles: int | None = None, shape: tuple[int, int] | None = None) -> None:
    try:
        check_tiling(tile, stride)  # the same rule as webapp.tile_size / webapp.tile_stride in params.yaml
    except ParamsError as exc:
        raise ScanError(str(exc)) from exc
    if max_tiles is not None and shape is not None:
        h, w = shape
        n = len(positions(h, tile, stride)) * len(positions(w, tile, stride))
        if n > max_tiles:
            raise ScanError(
                f"stride: {w}x{h} pixels with tile {tile} and stride {stride} make {n} tiles, more than the limit "
                f"of {max_tiles}; use a larger stride or tile"
            )


def scan(
    gray: np.ndarray,
    predict: PredictFn,
    classes: Sequence[str],
    *,
    tile: int,
    stride: int,
    preprocessor: Preprocessor,
    batch_size: int = 32,
    max_tiles: int | None = None,
    progress: bool | None = False,
    scale: ScaleUsed | None = None,
) -> TileScan:
    """Classify every tile of the decoded full-resolution grayscale image ``gray`` ``[H, W]`` uint8.

    ``preprocessor`` (the model's) crops the data bar once and resizes each tile to its cache size; ``predict``
    gets uint8 ``[B, cache_size, cache_size]`` batches. Raises ``ImageRejected`` for a featureless overview (the
    whole image, as a classify would see it); tiles are not checked. ``scale`` (a scale-aware model: the full
    image's pixel size, known or not): ``predict`` also gets each tile's scale input (the full image's pixel size
    times the tile's width over ``preprocessor.image_size``); None: ``predict(tiles)`` alone.
    """
    started = time.perf_counter()
    g = np.asarray(gray)
    if g.ndim != 2:
        raise ScanError(f"expected a 2-D grayscale image, got shape {g.shape}")
    check_options(tile, stride)
    g, bar_rows = preprocessor.crop(g)
    h, w = g.shape
    check_options(tile, stride, max_tiles, (h, w))
    preprocessor.check_features(preprocessor.resize(g))  # before any tile reaches the model
    ys, xs = positions(h, tile, stride), positions(w, tile, stride)
    side = min(tile, h, w) if (h < tile or w < tile) else tile
    tile_nm = None
    tile_scale: np.ndarray | None = None
    if scale is not None:
        tile_nm = model_input_pixel_size_nm(scale.nm, min(tile, w), int(preprocessor.image_size or 0))
        tile_scale = scale_features([tile_nm])
    coords = [(r, c) for r in range(len(ys)) for c in range(len(xs))]
    scores = np.zeros((len(ys), len(xs), len(classes)), dtype=np.float32)
    batch_size = max(1, int(batch_size))
    chunks = [coords[start : start + batch_size] for start in range(0, len(coords), batch_size)]

    def cut(chunk: list[tuple[int, int]]) -> np.ndarray:
        return preprocessor.tiles(g, [(ys[r], xs[c]) for r, c in chunk], tile)

    # The next batch is cut on a second thread while the model runs this one (NumPy's copies, PIL's resizes and
    # TensorFlow's kernels release the GIL): the scan runs at the forward pass's pace, not at forward + cutting.
    with (
        tqdm(total=len(coords), unit="tile", desc="scan", disable=None if progress is None else not progress) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="scan-cut") as cutter,
    ):
        upcoming = cutter.submit(cut, chunks[0])
        for k, chunk in enumerate(chunks):
            tiles = upcoming.result()
            if k + 1 < len(chunks):
                upcoming = cutter.submit(cut, chunks[k + 1])
            if tile_scale is None:
                proba = np.asarray(predict(tiles), dtype=np.float32)
            else:
                proba = np.asarray(predict(tiles, np.repeat(tile_scale, len(tiles), axis=0)), dtype=np.float32)
            if proba.shape != (len(chunk), len(classes)):
                raise RuntimeError(f"the model answered shape {proba.shape} for {len(chunk)} tiles")
            rows, cols = zip(*chunk, strict=True)
            scores[list(rows), list(cols)] = proba
            bar.update(len(chunk))
    return TileScan(
        classes=list(classes),
        scores=scores,
        xs=xs,
        ys=ys,
        tile=side,
        stride=stride,
        height=h,
        width=w,
        databar_rows=bar_rows,
        seconds=time.perf_counter() - started,
        pixel_size_nm=None if scale is None or tile_nm is None else scale.nm,
        tile_pixel_size_nm=tile_nm,
        pixel_size_source="" if scale is None else (scale.source if tile_nm is not None else "unknown"),
    )


def heatmap(result: TileScan, class_name: str, max_side: int = HEAT_MAX_SIDE) -> np.ndarray:
    """float32 ``[h, w]`` in 0..1: each pixel the mean score of ``class_name`` over the tiles covering it.

    Computed on a grid downscaled so its longer side is at most ``max_side`` (same aspect ratio as the scan).
    """
    k = result.class_index(class_name)
    f = max(1, math.ceil(max(result.height, result.width) / max_side))
    hh, ww = math.ceil(result.height / f), math.ceil(result.width / f)
    total = np.zeros((hh, ww), dtype=np.float64)
    count = np.zeros((hh, ww), dtype=np.float64)
    for r, y in enumerate(result.ys):
        for c, x in enumerate(result.xs):
            y0, x0 = y // f, x // f
            y1, x1 = (
                math.ceil(min(y + result.tile, result.height) / f),
                math.ceil(min(x + result.tile, result.width) / f),
            )
            total[y0:y1, x0:x1] += result.scores[r, c, k]
            count[y0:y1, x0:x1] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def heatmap_overlay(gray: np.ndarray, result: TileScan, class_name: str, max_side: int = HEAT_MAX_SIDE) -> np.ndarray:
    """uint8 RGB of the scanned area (downscaled to ``max_side``) with the class heat map blended over it."""
    heat = heatmap(result, class_name, max_side)
    g = np.asarray(gray)[: result.height, : result.width]
    small = np.asarray(Image.fromarray(np.ascontiguousarray(g)).resize((heat.shape[1], heat.shape[0]),
                                                                       Image.Resampling.BOX))  # fmt: skip
    return overlay(small, heat, alpha=0.5)


def write_outputs(
    gray: np.ndarray, result: TileScan, class_name: str, out_png: Path | None, out_csv: Path | None
) -> None:
    """The overlay PNG and/or the tile-score CSV, each written atomically."""
    if out_png is not None:
        data = png_bytes(heatmap_overlay(gray, result, class_name))
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(out_png)) as tmp:
            Path(tmp).write_bytes(data)
    if out_csv is not None:
        text = result.csv_text()
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(out_csv)) as tmp:
            Path(tmp).write_text(text)
