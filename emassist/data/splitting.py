"""Leak-free stratified split: exact and near duplicates always land in the same split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from emassist.data.grouping import as_hashes, components, cosine_pairs, hamming_pairs

SPLITS: tuple[str, ...] = ("train", "val", "test")


DIHEDRAL: tuple[str, ...] = (
    "identity",
    "rot90",
    "rot180",
    "rot270",
    "flip",
    "flip_rot90",
    "flip_rot180",
    "flip_rot270",
)
#: Kinds of link between two images, in the order the report lists them.
MEASURES: tuple[str, ...] = ("sha256", "dhash", "dihedral", "embedding")
#: Threads reading the cached PNGs for the dihedral hashes (PNG decoding and resizing release the GIL).
HASH_THREADS = 4


def dihedral_views(gray: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / quarter turns of an image, in the order of :data:`DIHEDRAL`."""
    g = np.asarray(gray)
    flipped = g[:, ::-1]
    return [np.rot90(g, k) for k in range(4)] + [np.rot90(flipped, k) for k in range(4)]


def dihedral_hashes(gray: np.ndarray | Image.Image) -> np.ndarray:
    """The dHash (:func:`emassist.data.hashing.dhash`, bit for bit) of each of the 8 views of an image, uint64 ``[8]``.

    The views are made by Pillow's transposes and hashed in NumPy: about 0.1 ms a view at 256 px.
    """
    im = gray if isinstance(gray, Image.Image) else Image.fromarray(np.ascontiguousarray(_as_uint8(gray)))
    out = np.empty(len(DIHEDRAL), dtype=np.uint64)
    k = 0
    for base in (im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        for turn in _TURNS:
            view = base if turn is None else base.transpose(turn)
            small = np.asarray(view.resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
            out[k] = int.from_bytes(np.packbits(small[:, 1:] > small[:, :-1]).tobytes(), "big")
            k += 1
    return out


_TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def _as_uint8(gray: np.ndarray) -> np.ndarray:
    g = np.asarray(gray)
    return g if g.dtype == np.uint8 else np.clip(g, 0, 255).astype(np.uint8)


def load_dihedral_hashes(paths: Sequence[Path], identity: Sequence[str] | None = None) -> np.ndarray:
    """``[N, 8]`` uint64 dihedral hashes of cached grayscale images (ingest's PNGs), one row per path.

    ``identity`` (the manifest's ``dhash`` column, computed by ingest from the same pixels) fills column 0, so the
    plain dHash grouping stays exactly what it was. A missing or unreadable image is a ``FileNotFoundError`` naming it.
    """

    def one(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                gray = np.asarray(im.convert("L"))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"cannot read the cached image {str(path)!r} ({exc}): rerun the ingest stage"
            ) from exc
        return dihedral_hashes(gray)

    if not paths:
        return np.empty((0, len(DIHEDRAL)), dtype=np.uint64)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        hashes = np.stack(list(pool.map(one, paths)))
    if identity is not None:
        hashes[:, 0] = as_hashes(identity)
    return hashes


def near_duplicate_pairs(hashes: Sequence[str], max_distance: int, chunk: int = 2048) -> list[tuple[int, int]]:
    """All index pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits (multi-index hashing,
    :func:`emassist.data.grouping.hamming_pairs`; ``chunk`` is the number of candidates verified per step)."""
    pairs = hamming_pairs(as_hashes(hashes), max_distance, batch=max(1, chunk))
    return [(int(i), int(j)) for i, j in pairs]


def dihedral_pairs(dihedral: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Image pairs (i < j) within ``max_distance`` bits under some flip / quarter turn, and whether each pair is
    already within it unturned (a plain dHash pair).

    ``dihedral`` is ``[N, 8]`` (column 0 the image itself). i and j are near duplicates when some view of one of
    them is within the distance of the other's plain hash: ``min_t min(H(h_t(i), h_0(j)), H(h_t(j), h_0(i)))``.
    """
    views = np.asarray(dihedral, dtype=np.uint64)
    n, k = views.shape
    found = hamming_pairs(views.ravel(), max_distance, views[:, 0])
    i, t, j = found[:, 0] // k, found[:, 0] % k, found[:, 1]
    keep = i != j
    i, t, j = i[keep], t[keep], j[keep]
    key = np.minimum(i, j) * max(n, 1) + np.maximum(i, j)
    plain = pd.Series(t == 0).groupby(key).any()
    keys = plain.index.to_numpy(dtype=np.int64)
    return np.stack([keys // max(n, 1), keys % max(n, 1)], axis=1), plain.to_numpy(dtype=bool)


def near_duplicate_links(
    frame: pd.DataFrame,
    max_distance: int,
    *,
    dihedral: np.ndarray | None = None,
    embedding_pairs: np.ndarray | None = None,
) -> pd.DataFrame:
    """Every link between two rows (``i < j``), with its measure: ``sha256`` (same file), ``dhash`` (hashes within
    ``max_distance`` bits), ``dihedral`` (within it only after a flip / quarter turn; needs ``dihedral``, ``[N, 8]``
    aligned with the rows) and ``embedding`` (the given pairs). A pair may be listed under several measures."""
    n = len(frame)
    parts: list[pd.DataFrame] = []
    codes = pd.factorize(frame["sha256"])[0]
    first = pd.Series(np.arange(n)).groupby(codes).transform("min").to_numpy()
    same = np.nonzero(first != np.arange(n))[0]
    parts.append(pd.DataFrame({"i": first[same], "j": same, "measure": "sha256"}))
    if dihedral is None:
        pairs = hamming_pairs(as_hashes(frame["dhash"]), max_distance)
        parts.append(pd.DataFrame({"i": pairs[:, 0], "j": pairs[:, 1], "measure": "dhash"}))
    else:
        if np.shape(dihedral) != (n, len(DIHEDRAL)):
            raise ValueError(
                f"dihedral hashes must be [{n}, {len(DIHEDRAL)}] (one row per image), got {np.shape(dihedral)}"
            )
        pairs, plain = dihedral_pairs(dihedral, max_distance)
        parts.append(
            pd.DataFrame({"i": pairs[:, 0], "j": pairs[:, 1], "measure": np.where(plain, "dhash", "dihedral")})
        )
    if embedding_pairs is not None:
        e = np.asarray(embedding_pairs, dtype=np.int64).reshape(-1, 2)
        parts.append(pd.DataFrame({"i": e[:, 0], "j": e[:, 1], "measure": "embedding"}))
    links = pd.concat(parts, ignore_index=True).astype({"i": np.int64, "j": np.int64})
    return links.sort_values(["i", "j", "measure"], kind="stable").reset_index(drop=True)


def groups_of(n: int, links: pd.DataFrame) -> np.ndarray:
    """Group id per row: connected components over the links, numbered in order of first appearance."""
    return components(n, links[["i", "j"]].to_numpy(dtype=np.int64))


def duplicate_groups(
    frame: pd.DataFrame,
    max_distance: int,
    *,
    dihedral: np.ndarray | None = None,
    embedding_pairs: np.ndarray | None = None,
) -> np.ndarray:
    """Group id per row: rows linked by sha256, dHash within ``max_distance`` bits (also under flips and quarter
    turns when ``dihedral`` is given) or an embedding pair share a group (connected components)."""
    links = near_duplicate_links(frame, max_distance, dihedral=dihedral, embedding_pairs=embedding_pairs)
    return groups_of(len(frame), links)


@dataclass
class SplitResult:
    """The split: a frame per split, the duplicate groups, and where each row came from.

    ``rows[split]`` holds, aligned with ``frames[split]``, each row's position in the manifest given to
    :func:`split_manifest` (to pick its dihedral hashes and embeddings for the leakage audit). ``links`` counts the
    distinct image pairs linked by each measure of :data:`MEASURES`.
    """

    frames: dict[str, pd.DataFrame]
    n_groups: int
    n_duplicate_groups: int
    n_exact_duplicates_dropped: int
    largest_group: int
    conflicting_labels: list[str] = field(default_factory=list)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    links: dict[str, int] = field(default_factory=dict)

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
            "linked_pairs": self.links,
        }


def split_manifest(
    manifest: pd.DataFrame,
    ratios: Mapping[str, float],
    *,
    seed: int,
    near_dup_distance: int,
    dihedral: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    embedding_threshold: float = 0.94,
) -> SplitResult:
    """Assign whole duplicate groups to splits so each class follows ``ratios`` as closely as possible.

    Exact duplicate files (same sha256) are kept once; if they carry different labels the image is
    ambiguous and dropped (listed in ``conflicting_labels``). Near duplicates stay as separate rows but
    in one split: dHash within ``near_dup_distance`` bits, also after a flip or quarter turn when ``dihedral``
    (``[N, 8]``, :func:`load_dihedral_hashes`) is given, and cosine similarity >= ``embedding_threshold`` between
    ``embeddings`` (``[N, D]``) when given. Both arrays are aligned with ``manifest``'s rows.
    """
    n = len(manifest)
    for name, array in (("dihedral", dihedral), ("embeddings", embeddings)):
        if array is not None and (np.ndim(array) != 2 or len(array) != n):
            raise ValueError(f"{name}: need one row per manifest row ({n}), got shape {np.shape(array)}")
    frame = manifest.assign(_row=np.arange(n)).sort_values("source_path").reset_index(drop=True)
    labels_per_sha = frame.groupby("sha256")["label"].nunique()
    conflicting = sorted(labels_per_sha[labels_per_sha > 1].index)
    frame = frame[~frame["sha256"].isin(conflicting)]
    deduped = frame.drop_duplicates("sha256").reset_index(drop=True)
    n_dropped = len(frame) - len(deduped)

    rows = deduped["_row"].to_numpy()
    embedding_pairs = None if embeddings is None else cosine_pairs(np.asarray(embeddings)[rows], embedding_threshold)
    links = near_duplicate_links(
        deduped,
        near_dup_distance,
        dihedral=None if dihedral is None else np.asarray(dihedral)[rows],
        embedding_pairs=embedding_pairs,
    )
    group = groups_of(len(deduped), links)
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
    distinct = links.drop_duplicates(["i", "j", "measure"])["measure"].value_counts()
    measures = [m for m in MEASURES if m != "dihedral" or dihedral is not None]
    measures = [m for m in measures if m != "embedding" or embeddings is not None]
    return SplitResult(
        frames={s: f.drop(columns="_row") for s, f in frames.items()},
        n_groups=len(group_sizes),
        n_duplicate_groups=sum(1 for size in group_sizes.values() if size > 1),
        n_exact_duplicates_dropped=n_dropped,
        largest_group=max(group_sizes.values(), default=0),
        conflicting_labels=conflicting,
        rows={s: f["_row"].to_numpy() for s, f in frames.items()},
        links={m: int(distinct.get(m, 0)) for m in measures},
    )
