"""Driver: class counts, a deterministic per-image plan, parallel rendering, atomic output folder.

The settings come as :class:`emassist.config.settings.DemoParams`, validated by ``load_params`` (or, for command-line
overrides, by the same ``DemoParams.check``): they are not checked again here.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from emassist.config.classes import CLASSES, NFFA_COUNTS
from emassist.config.settings import DemoParams
from emassist.core.atomic import atomic_path
from emassist.data.demo import scenes
from emassist.data.demo._raster import log_uniform
from emassist.data.demo.sem_look import draw_databar, sem_image
from emassist.data.sem_metadata import TAG_IMAGE_DESCRIPTION

EXTENSIONS = ("jpg", "png", "tif")
JPG_SHARE = 0.75  # of the non-TIFF images; the rest are PNG

# Seed-sequence tags keep the different random streams of one seed apart.
_TAG_IMAGE = 1
_TAG_PLAN = 2
_TAG_SCALE = 3  # the physical scale: its own stream, so the rendering's stream (and the images) stay as they were


def image_rng(seed: int, class_index: int, index: int) -> np.random.Generator:
    """The random stream that renders demo image (seed, class, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, _TAG_IMAGE, class_index, index]))


def true_pixel_size_nm(seed: int, class_index: int, index: int, height: int, width: int) -> float:
    """The true pixel size of demo image (seed, class, index) at ``height`` × ``width``: what its data bar and TIFF
    tags say, for tests to check the reading against (a pure function: nothing is written for ingest to read).

    The class's nm per world unit (:data:`~emassist.data.demo.scenes.NM_PER_UNIT`, its own random stream) over the
    scene's pixels per world unit (the first draw of the image's stream, as in :func:`render_image`): the pixels are
    drawn as they always were, the pixel size carries the physical scale.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SCALE, class_index, index]))
    nm_per_unit = log_uniform(rng, *scenes.NM_PER_UNIT[CLASSES[class_index]])
    return nm_per_unit / scenes.pixels_per_unit(image_rng(seed, class_index, index), height, width)


@dataclass(frozen=True)
class Job:
    """One image to render: everything a worker needs, picklable."""

    out_dir: str
    class_index: int
    index: int
    name: str
    databar: bool
    width: int
    height: int
    seed: int

    @property
    def class_name(self) -> str:
        return CLASSES[self.class_index]

    @property
    def ext(self) -> str:
        return self.name.rsplit(".", 1)[1]

    @property
    def pixel_size_nm(self) -> float:
        return true_pixel_size_nm(self.seed, self.class_index, self.index, self.height, self.width)


def class_counts(n_images: int, min_per_class: int) -> dict[str, int]:
    """Images per class: proportional to the real dataset's counts, but at least ``min_per_class`` each.

    Classes whose share falls below the floor are raised to it and the rest are re-apportioned among the
    other (larger) classes; integer counts by largest remainder, so the total is exactly ``n_images``.
    ``n_images >= min_per_class * len(CLASSES)`` (``demo.n_images`` / ``demo.min_per_class``, checked at load).
    """
    fixed: dict[str, int] = {}
    while True:
        free = [c for c in CLASSES if c not in fixed]
        budget = n_images - min_per_class * len(fixed)
        if not free:
            break
        weight = sum(NFFA_COUNTS[c] for c in free)
        quota = {c: budget * NFFA_COUNTS[c] / weight for c in free}
        low = [c for c in free if quota[c] < min_per_class]
        if not low:
            break
        fixed.update(dict.fromkeys(low, min_per_class))
    counts = dict(fixed)
    if free:
        counts.update({c: math.floor(quota[c]) for c in free})
        left = budget - sum(counts[c] for c in free)
        by_remainder = sorted(free, key=lambda c: (-(quota[c] - math.floor(quota[c])), CLASSES.index(c)))
        for c in by_remainder[:left]:
            counts[c] += 1
    return {c: counts[c] for c in CLASSES}


def image_name(seed: int, class_index: int, index: int, ext: str) -> str:
    """``L2_<32 hex>.<ext>``, like the real dataset; derived from (seed, class, index)."""
    state = np.random.SeedSequence([seed, _TAG_IMAGE, class_index, index]).generate_state(4)
    return "L2_" + "".join(f"{int(v):08x}" for v in state) + "." + ext


def plan(
    out_dir: Path,
    counts: dict[str, int],
    *,
    width: int,
    height: int,
    seed: int,
    tif_fraction: float,
    databar_fraction: float,
) -> list[Job]:
    """Every image's class, name, format and data-bar flag.

    Per class, exactly round(n × fraction) images are TIFF and (independently) carry a data bar, so
    neither format nor data bar says anything about the class.
    """
    jobs: list[Job] = []
    for ci, cls in enumerate(CLASSES):
        n = counts[cls]
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_PLAN, ci]))
        tif = set(rng.permutation(n)[: math.floor(n * tif_fraction + 0.5)].tolist())
        bar = set(rng.permutation(n)[: math.floor(n * databar_fraction + 0.5)].tolist())
        jpg = rng.random(n) < JPG_SHARE
        for i in range(n):
            ext = "tif" if i in tif else ("jpg" if jpg[i] else "png")
            jobs.append(Job(str(out_dir), ci, i, image_name(seed, ci, i, ext), i in bar, width, height, seed))
    return jobs


def render_image(job: Job) -> tuple[np.ndarray, np.random.Generator]:
    """The image of ``job`` as floats in [0, 1], and its random generator (for the encoder's choices)."""
    rng = image_rng(job.seed, job.class_index, job.index)
    u = scenes.pixels_per_unit(rng, job.height, job.width)  # first: true_pixel_size_nm replays this draw
    height_map, albedo = scenes.render_scene(job.class_name, rng, job.height, job.width, u)
    img = sem_image(height_map, albedo, rng)
    if job.databar:
        img = draw_databar(img, rng, job.pixel_size_nm)
    return img, rng


def _tiff_tags(job: Job) -> dict[int, str]:
    """The pixel size as an instrument writes it: ``PixelSize=`` in ImageDescription (read by sem_metadata)."""
    return {TAG_IMAGE_DESCRIPTION: f"[emassist synthetic demo]\nPixelSize={job.pixel_size_nm:.6g} nm\n"}


def write_image(job: Job) -> str:
    """Render and write one image into ``job.out_dir/<class>/``; returns the class name."""
    img, rng = render_image(job)
    path = Path(job.out_dir) / job.class_name / job.name
    if job.ext == "tif":
        Image.fromarray((img * 65535.0 + 0.5).astype(np.uint16)).save(
            path, format="TIFF", compression="tiff_adobe_deflate", tiffinfo=_tiff_tags(job)
        )
    else:
        pil = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8))
        if job.ext == "jpg":
            pil.save(path, format="JPEG", quality=int(rng.integers(80, 96)))
        else:
            pil.save(path, format="PNG")
    return job.class_name


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything that is not an earlier demo output (or empty)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ValueError(f"out_dir: {out_dir} exists and is not a directory")
    strangers = sorted(p.name for p in out_dir.iterdir() if not (p.is_dir() and p.name in CLASSES))
    if strangers:
        raise ValueError(
            f"out_dir: {out_dir} holds entries that are not class folders ({', '.join(strangers[:5])}); "
            "refusing to replace it"
        )


def generate_demo(out_dir: Path, demo: DemoParams, *, workers: int = 0, progress: bool = True) -> dict[str, int]:
    """Write a synthetic SEM dataset per ``demo`` to ``out_dir/<Class>/L2_<hex>.<jpg|png|tif>``; images per class.

    The output is a pure function of ``demo`` (byte-identical files for any ``workers`` count; 0: all cores).
    ``out_dir`` is replaced atomically: a failed or killed run leaves it as it was. An existing ``out_dir`` may only
    hold class folders (an earlier demo run).
    """
    out_dir = Path(out_dir)
    if workers < 0:  # an argument of this call, not a setting
        raise ValueError(f"workers: must be >= 0 (0: all cores), got {workers}")
    counts = class_counts(demo.n_images, demo.min_per_class)
    _check_out_dir(out_dir)
    n_workers = min(workers or os.cpu_count() or 1, demo.n_images)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for cls in CLASSES:
            (tmp / cls).mkdir()
        jobs = plan(
            tmp,
            counts,
            width=demo.width,
            height=demo.height,
            seed=demo.seed,
            tif_fraction=demo.tif_fraction,
            databar_fraction=demo.databar_fraction,
        )
        with tqdm(total=len(jobs), desc="demo images", unit="img", disable=not progress) as bar:
            if n_workers == 1:
                for job in jobs:
                    write_image(job)
                    bar.update()
            else:
                chunk = max(1, min(16, len(jobs) // (n_workers * 8)))
                with multiprocessing.Pool(n_workers) as pool:
                    for _ in pool.imap_unordered(write_image, jobs, chunksize=chunk):
                        bar.update()
    return counts
