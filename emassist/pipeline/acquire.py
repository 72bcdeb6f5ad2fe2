"""The acquire step: data/raw/<Class>/ from synthetic demo images, the NFFA-EUROPE dataset, or an S3 bucket, then
the microscopists' corrections (``monitoring.feedback_dir``) merged in, so they go through ingest, validation and the
leakage-aware split like every image."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emassist.config.settings import Params, ParamsError, check_class_names
from emassist.data.demo import generate_demo
from emassist.data.feedback import MergeReport, merge_feedback
from emassist.data.fetch import FetchError, FetchReport, fetch_nffa
from emassist.data.s3 import PullReport, S3Error, pull
from emassist.pipeline.stagerun import StageError


def generate(params: Params, out_dir: Path, **overrides: Any) -> dict[str, int]:
    """Demo images from ``params.demo``; keyword overrides (n_images, width, height, seed, min_per_class) win and go
    through the same check as params.yaml's values (a value that does not fit is a :class:`StageError`)."""
    demo = dataclasses.replace(params.demo, **{k: v for k, v in overrides.items() if v is not None})
    if demo != params.demo:
        try:
            demo.check()
        except ParamsError as exc:
            raise StageError(f"{exc} (with the values given on the command line)") from exc
    return generate_demo(out_dir, demo)


def fetch(params: Params, out_dir: Path, classes: Sequence[str] | None = None) -> FetchReport:
    """The real dataset per ``params.nffa`` (resumable, MD5-verified, safely extracted)."""
    if classes:
        try:
            check_class_names("--classes", classes)
        except ParamsError as exc:
            raise StageError(str(exc)) from exc
    try:
        return fetch_nffa(out_dir, params.nffa, tuple(classes or params.data.classes))
    except FetchError as exc:
        raise StageError(str(exc)) from exc


def pull_s3(params: Params, out_dir: Path, **kwargs: Any) -> PullReport:
    """``s3://s3.bucket/s3.prefix/<Class>/...`` into out_dir (checked keys, verified, parallel, retried)."""
    try:
        return pull(params.s3, out_dir, params.data.classes, **kwargs)
    except S3Error as exc:
        raise StageError(str(exc)) from exc


def merge_corrections(params: Params, raw_dir: Path) -> MergeReport:
    """``feedback_dir/<Class>/*`` into ``raw_dir/<Class>/feedback_*`` (nothing when the folder is absent)."""
    return merge_feedback(Path(params.monitoring.feedback_dir), raw_dir, params.data.classes)


def main(params: Params) -> None:
    raw_dir = Path(params.data.raw_dir)
    if params.data.source == "demo":
        counts = generate(params, raw_dir)
        print(f"generated {sum(counts.values())} demo images in {raw_dir}: {counts}")
    elif params.data.source == "s3":
        print(pull_s3(params, raw_dir))
    else:
        print(fetch(params, raw_dir).summary())
    print(merge_corrections(params, raw_dir).summary())
