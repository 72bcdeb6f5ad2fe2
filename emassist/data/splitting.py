"""Leak-free stratified split: exact and near duplicates always land in the same split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SPLITS: tuple[str, ...] = ("train", "val", "test")


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_pairs(hashes: Sequence[str], max_distance: int, chunk: int = 2048) -> list[tuple[int, int]]:
    """All index pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits."""
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(values), chunk):
        block = values[start : start + chunk]
        # Compare the block only with itself and later items: each pair once.
        rest = values[start:]
        dist = np.bitwise_count(block[:, None] ^ rest[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        keep = jj > ii
        pairs.extend(zip((ii[keep] + start).tolist(), (jj[keep] + start).tolist(), strict=True))
    return pairs


def duplicate_groups(frame: pd.DataFrame, max_distance: int) -> np.ndarray:
    """Group id per row: rows with the same sha256 or dhashes within ``max_distance`` share a group."""
    uf = _UnionFind(len(frame))
    first_by_sha: dict[str, int] = {}
    for i, sha in enumerate(frame["sha256"]):
        if sha in first_by_sha:
            uf.union(first_by_sha[sha], i)
        else:
            first_by_sha[sha] = i
    for i, j in near_duplicate_pairs(list(frame["dhash"]), max_distance):
        uf.union(i, j)
    roots = np.array([uf.find(i) for i in range(len(frame))])
    # Renumber groups 0..k-1 in order of first appearance for stable output.
    _, group = np.unique(roots, return_inverse=True)
    return group


@dataclass
class SplitResult:
    frames: dict[str, pd.DataFrame]
    n_groups: int
    n_duplicate_groups: int
    n_exact_duplicates_dropped: int
    largest_group: int
    conflicting_labels: list[str] = field(default_factory=list)

    def counts(self) -> pd.DataFrame:
        table = pd.DataFrame({s: f["label"].value_counts() for s, f in self.frames.items()}).fillna(0).astype(int)
        table["total"] = table.sum(axis=1)
        return table.sort_index()

    def report(self) -> dict[str, object]:
        return {
            "counts": {cls: row.to_dict() for cls, row in self.counts().iterrows()},
            "n_groups": self.n_groups,
            "n_duplicate_groups": self.n_duplicate_groups,
            "n_exact_duplicates_dropped": self.n_exact_duplicates_dropped,
            "largest_group": self.largest_group,
            "conflicting_labels": self.conflicting_labels,
        }


def split_manifest(
    manifest: pd.DataFrame,
    ratios: Mapping[str, float],
    *,
    seed: int,
    near_dup_distance: int,
) -> SplitResult:
    """Assign whole duplicate groups to splits so each class follows ``ratios`` as closely as possible.

    Exact duplicate files (same sha256) are kept once; if they carry different labels the image is
    ambiguous and dropped (listed in ``conflicting_labels``). Near duplicates stay as separate rows but
    in one split.
    """
    frame = manifest.sort_values("source_path").reset_index(drop=True)
    labels_per_sha = frame.groupby("sha256")["label"].nunique()
    conflicting = sorted(labels_per_sha[labels_per_sha > 1].index)
    frame = frame[~frame["sha256"].isin(conflicting)]
    deduped = frame.drop_duplicates("sha256").reset_index(drop=True)
    n_dropped = len(frame) - len(deduped)

    group = duplicate_groups(deduped, near_dup_distance)
    deduped = deduped.assign(group=group)
    group_sizes = Counter(group.tolist())
    # A group's class is its most common label (ties → alphabetical), used only to balance the split.
    group_label = deduped.groupby("group")["label"].agg(lambda s: sorted(s.mode())[0])

    rng = np.random.default_rng(seed)
    assignment: dict[int, str] = {}
    names = list(ratios)
    for label in sorted(group_label.unique()):
        groups = np.array(sorted(group_label[group_label == label].index))
        rng.shuffle(groups)
        # Big groups first, so the small ones can even out the counts afterwards.
        groups = sorted(groups.tolist(), key=lambda g: -group_sizes[g])
        total = sum(group_sizes[g] for g in groups)
        filled = dict.fromkeys(names, 0)
        for g in groups:
            # The split with the largest shortfall against its target takes the group.
            deficit = {s: ratios[s] * total - filled[s] for s in names}
            best = max(names, key=lambda s: (deficit[s], ratios[s]))
            assignment[g] = best
            filled[best] += group_sizes[g]

    deduped["split"] = deduped["group"].map(assignment)
    frames = {
        s: deduped[deduped["split"] == s].drop(columns="split").sort_values("source_path").reset_index(drop=True)
        for s in names
    }
    return SplitResult(
        frames=frames,
        n_groups=len(group_sizes),
        n_duplicate_groups=sum(1 for size in group_sizes.values() if size > 1),
        n_exact_duplicates_dropped=n_dropped,
        largest_group=max(group_sizes.values(), default=0),
        conflicting_labels=conflicting,
    )
