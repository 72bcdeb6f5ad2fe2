"""The split step: stratified train/val/test lists with exact and near duplicates kept in one split.

Writes ``data/splits/{train,val,test}.csv`` and the split report ``reports/split.json`` (per-class counts and
duplicate groups: a plain report, not a DVC metric, so ``dvc metrics show`` stays on the headline figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.data.splitting import split_manifest

REPORT = Path("reports/split.json")
COLUMNS = ["sha256", "label", "image_path", "source_path", "group"]


def main(params: Params) -> None:
    interim = Path(params.data.interim_dir)
    manifest = pd.read_parquet(interim / "manifest.parquet")
    result = split_manifest(
        manifest, params.split.ratios, seed=params.split.seed, near_dup_distance=params.split.near_dup_distance
    )
    splits_dir = Path(params.data.splits_dir)
    for name, frame in result.frames.items():
        out = frame.assign(image_path=[(interim / p).as_posix() for p in frame["image_path"]])[COLUMNS]
        with atomic_open(splits_dir / f"{name}.csv", newline="") as fh:
            out.to_csv(fh, index=False)
    with atomic_open(REPORT) as fh:
        json.dump(result.report(), fh, indent=2)
    print(result.counts().to_string())
    print(
        f"{result.n_groups} groups, {result.n_duplicate_groups} with duplicates "
        f"(largest {result.largest_group}); {result.n_exact_duplicates_dropped} exact duplicate files kept once; "
        f"{len(result.conflicting_labels)} images with conflicting labels dropped"
    )
