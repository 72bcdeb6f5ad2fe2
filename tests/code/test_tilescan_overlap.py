"""The tile scan overlaps the data-bar search with scoring the tiles above it: same answers, same refusals."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from emassist.data.databar import rows_never_cropped
from emassist.data.decode import ImageRejected
from emassist.data.preprocess import Preprocessor
from emassist.serve import tilescan


@dataclass(frozen=True)
class SlowCrop(Preprocessor):
    """A preprocessor whose data-bar search takes a while (as on a 100-megapixel overview)."""

    def crop(self, gray: np.ndarray) -> tuple[np.ndarray, int]:
        time.sleep(0.4)
        return super().crop(gray)


def _slow(cache_size: int = 32, min_contrast: float = 2.0) -> SlowCrop:
    return SlowCrop(cache_size, True, max_pixels=10**8, min_side=16, min_contrast=min_contrast)


def _overview(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, 640)[None, :] + 30 * np.sin(np.arange(1000) / 40.0)[:, None]  # structure at every size
    gray = (ramp + rng.normal(0, 20, (1000, 640))).clip(0, 255).astype(np.uint8)
    gray[-60:] = 0  # a dark data bar with text-like marks
    gray[-40:-30, 10:400:3] = 255
    return gray


def test_tiles_above_the_bar_band_are_scored_while_the_crop_runs_and_the_answer_is_the_same() -> None:
    gray = _overview()
    slow = _slow()
    seen: dict[tuple[int, int], float] = {}
    during_crop: list[int] = []
    crop_thread_busy = threading.Event()

    def predict(tiles: np.ndarray) -> np.ndarray:
        if not crop_thread_busy.is_set():
            during_crop.append(len(tiles))
        p = tiles.reshape(len(tiles), -1).mean(axis=1) / 255.0
        return np.stack([1 - p, p], axis=1)

    timer = threading.Timer(0.35, crop_thread_busy.set)
    timer.start()
    res = tilescan.scan(gray, predict, ["dark", "bright"], tile=128, stride=64, preprocessor=slow, batch_size=4)
    timer.cancel()
    assert sum(during_crop) > 0, "no tile was scored while the data bar was searched"

    # The same grid and scores as tiles cut from the cropped image, one by one.
    cropped, rows = Preprocessor.crop(slow, gray)
    assert res.databar_rows == rows > 0 and res.height == cropped.shape[0]
    assert res.ys == tilescan.positions(cropped.shape[0], 128, 64) and res.xs == tilescan.positions(640, 128, 64)
    for r, y in enumerate(res.ys):
        for c, x in enumerate(res.xs):
            tile = slow.tiles(cropped, [(y, x)], 128)
            seen[(y, x)] = float(tile.mean() / 255.0)
            assert res.scores[r, c, 1] == pytest.approx(seen[(y, x)], abs=1e-6)


def test_a_featureless_overview_is_refused_before_a_tile_below_the_band_is_scored() -> None:
    gray = np.full((1000, 640), 100, dtype=np.uint8)  # blank frame
    below: list[int] = []
    band = rows_never_cropped(1000)

    def predict(tiles: np.ndarray) -> np.ndarray:
        return np.tile([0.5, 0.5], (len(tiles), 1))

    class Watch(SlowCrop):
        def tiles(self, full: np.ndarray, corners, tile: int) -> np.ndarray:
            below.extend(y for y, _ in corners if y + tile > band)
            return super().tiles(full, corners, tile)

    pre = Watch(32, True, max_pixels=10**8, min_side=16)
    with pytest.raises(ImageRejected, match="featureless"):
        tilescan.scan(gray, predict, ["a", "b"], tile=128, stride=64, preprocessor=pre, batch_size=4)
    assert below == []


def test_an_overview_over_the_tile_limit_is_refused_before_any_tile_is_scored() -> None:
    calls: list[int] = []

    def predict(tiles: np.ndarray) -> np.ndarray:
        calls.append(len(tiles))
        return np.tile([0.5, 0.5], (len(tiles), 1))

    with pytest.raises(tilescan.ScanError, match="more than the limit"):
        tilescan.scan(_overview(), predict, ["a", "b"], tile=128, stride=64, preprocessor=_slow(), max_tiles=10)
    assert calls == []
