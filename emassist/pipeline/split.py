"""The split step: stratified train/val/test lists with exact and near duplicates kept in one split, and the audit.

Near duplicates: same sha256, dHash within ``split.near_dup_distance`` bits (also after any flip / quarter turn,
hashed here from ingest's cached PNGs) and, when ``split.embedding`` is set, cosine similarity of frozen backbone
features >= ``split.embedding_threshold`` (:mod:`emassist.model.embedding`). Groups are the connected components.

Writes ``data/splits/{train,val,test}.csv``, the split report ``reports/split.json`` (per-class counts, duplicate
groups, the leakage audit: a plain report, not a DVC metric, so ``dvc metrics show`` stays on the headline figures),
and the audit's plot ``reports/plots/leakage.png`` with its data ``reports/plots/leakage.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open, atomic_path
from emassist.data.leakage import audit_split
from emassist.data.splitting import load_dihedral_hashes, split_manifest
from emassist.model.embedding import EmbeddingError, check_backbone, embed_images
from emassist.pipeline.stagerun import StageError

REPORT = Path("reports/split.json")
LEAKAGE_PLOT = Path("reports/plots/leakage.png")
LEAKAGE_CSV = Path("reports/plots/leakage.csv")
COLUMNS = ["sha256", "label", "image_path", "source_path", "group"]


def main(params: Params) -> None:
    s = params.split
    if s.embedding is not None:
        try:
            check_backbone(s.embedding_backbone, s.embedding_image_size)  # before any work
        except ValueError as exc:
            raise StageError(str(exc)) from exc
    interim = Path(params.data.interim_dir)
    manifest = pd.read_parquet(interim / "manifest.parquet")
    paths = [interim / p for p in manifest["image_path"]]
    dihedral = load_dihedral_hashes(paths, manifest["dhash"])
    embeddings = None
    if s.embedding is not None:
        try:
            embeddings = embed_images(
                paths, backbone=s.embedding_backbone, weights=s.embedding, image_size=s.embedding_image_size
            )
        except EmbeddingError as exc:
            raise StageError(str(exc)) from exc
    result = split_manifest(
        manifest,
        s.ratios,
        seed=s.seed,
        near_dup_distance=s.near_dup_distance,
        dihedral=dihedral,
        embeddings=embeddings,
        embedding_threshold=s.embedding_threshold,
    )
    audit = audit_split(
        result,
        dihedral,
        embeddings,
        ratios=s.ratios,
        seed=s.seed,
        max_distance=s.near_dup_distance,
        embedding_threshold=s.embedding_threshold,
        names=manifest["source_path"],
    )
    splits_dir = Path(params.data.splits_dir)
    for name, frame in result.frames.items():
        out = frame.assign(image_path=[(interim / p).as_posix() for p in frame["image_path"]])[COLUMNS]
        with atomic_open(splits_dir / f"{name}.csv", newline="") as fh:
            out.to_csv(fh, index=False)
    with atomic_open(REPORT) as fh:
        json.dump({**result.report(), "leakage": audit.report()}, fh, indent=2)
    with atomic_open(LEAKAGE_CSV, newline="") as fh:
        audit.curve().to_csv(fh, index=False)
    with atomic_path(LEAKAGE_PLOT) as tmp:
        audit.plot(tmp)
    print(result.counts().to_string())
    print(
        f"{result.n_groups} groups, {result.n_duplicate_groups} with duplicates "
        f"(largest {result.largest_group}); {result.n_exact_duplicates_dropped} exact duplicate files kept once; "
        f"{len(result.conflicting_labels)} images with conflicting labels dropped; linked pairs "
        + ", ".join(f"{m} {n}" for m, n in result.links.items())
    )
    print(audit.summary())
