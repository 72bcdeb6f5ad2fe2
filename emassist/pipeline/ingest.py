"""The ingest step: decode every raw image, crop the data bar, cache 8-bit PNGs, quarantine what cannot be read."""

from __future__ import annotations

from pathlib import Path

from emassist.config.settings import Params
from emassist.data.ingest import IngestSummary, run_ingest
from emassist.pipeline.stagerun import StageError


def ingest(params: Params, raw_dir: Path, out_dir: Path) -> IngestSummary:
    """``raw_dir/<Class>/*`` into ``out_dir`` (manifest, cached PNGs, rejected.csv) per ``params.ingest``."""
    if not raw_dir.is_dir():
        raise StageError(f"{raw_dir} does not exist: run the acquire stage (dvc repro acquire) or dvc pull")
    i = params.ingest
    return run_ingest(
        raw_dir,
        out_dir,
        classes=params.data.classes,
        cache_size=i.cache_size,
        max_pixels=i.max_pixels,
        min_side=i.min_side,
        crop_databar=i.crop_databar,
        min_contrast=i.min_contrast,
        workers=i.workers,
        read_databar=i.read_databar,
    )


def main(params: Params) -> None:
    print(ingest(params, Path(params.data.raw_dir), Path(params.data.interim_dir)))
