"""Leakage audit: how close each test image comes to the train split, under our split and under a plain random one.

For every test image: its nearest train image by plain dHash, by dihedral dHash (the same measure the split groups
by: some flip / quarter turn of one image within the distance of the other) and, when embeddings are on, by cosine
similarity. Then the share of test images with a near duplicate in train (distance <= ``split.near_dup_distance``,
cosine >= ``split.embedding_threshold``) under our split, and under a stratified random split of the same images
with the same ratios and seed (the peer's table: 23.4 % on NFFA). Ours is 0 by construction for every measure it
groups by: a near-duplicate pair is a link, and linked images share a group, hence a split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from emassist.data.grouping import nearest_cosine, nearest_hamming
from emassist.data.splitting import SplitResult

#: Distances (bits) of the cumulative curve in the plot and its CSV.
CURVE_BITS = 24


def random_split(labels: np.ndarray, ratios: Mapping[str, float], seed: int) -> np.ndarray:
    """A plain stratified random split, image by image (no grouping): the split name of each label."""
    labels = np.asarray(labels)
    names = list(ratios)
    out = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    for label in sorted(set(labels.tolist())):
        idx = np.nonzero(labels == label)[0]
        rng.shuffle(idx)
        cuts = np.round(np.cumsum([ratios[s] for s in names]) * len(idx)).astype(int)
        for name, lo, hi in zip(names, [0, *cuts[:-1].tolist()], cuts.tolist(), strict=True):
            out[idx[lo:hi]] = name
    return out


def nearest_train(
    test: np.ndarray, train: np.ndarray, dihedral: np.ndarray, embeddings: np.ndarray | None = None
) -> pd.DataFrame:
    """Per test row (indices into ``dihedral`` / ``embeddings``): the nearest train row by each measure.

    Columns: ``dhash_train``/``dhash_distance`` (plain hashes), ``dihedral_train``/``dihedral_distance``
    (``min_t min(H(h_t(test), h_0(train)), H(h_t(train), h_0(test)))``, as the grouping links) and, with
    embeddings, ``embedding_train``/``cosine``. Train ids are indices into the same arrays.
    """
    views = np.asarray(dihedral, dtype=np.uint64)
    k = views.shape[1]
    plain_idx, plain_d = nearest_hamming(views[test, 0], views[train, 0])
    # A view of the test image against the train images' plain hashes ...
    idx1, d1 = nearest_hamming(views[test].ravel(), views[train, 0])
    idx1, d1 = idx1.reshape(len(test), k), d1.reshape(len(test), k)
    best_t = d1.argmin(axis=1)
    rows = np.arange(len(test))
    idx1, d1 = idx1[rows, best_t], d1[rows, best_t]
    # ... and every view of the train images against the test image's plain hash.
    idx2, d2 = nearest_hamming(views[test, 0], views[train].ravel())
    idx2 = idx2 // k
    use2 = d2 < d1
    frame = pd.DataFrame(
        {
            "test": test,
            "dhash_train": train[plain_idx],
            "dhash_distance": plain_d,
            "dihedral_train": train[np.where(use2, idx2, idx1)],
            "dihedral_distance": np.minimum(d1, d2),
        }
    )
    if embeddings is not None:
        e = np.asarray(embeddings)
        idx, sim = nearest_cosine(e[test], e[train])
        frame["embedding_train"] = train[idx]
        frame["cosine"] = sim
    return frame


@dataclass
class LeakageAudit:
    """The audit of our split and of a random split of the same images (``nearest`` frames per split kind)."""

    nearest: dict[str, pd.DataFrame]  # "ours" / "random" → nearest_train() frame with image names
    max_distance: int
    embedding_threshold: float | None

    def near(self, kind: str) -> pd.DataFrame:
        """Booleans per test image: a near duplicate in train by each measure, and by any."""
        f = self.nearest[kind]
        flags = pd.DataFrame(
            {
                "dhash": f["dhash_distance"] <= self.max_distance,
                "dihedral": f["dihedral_distance"] <= self.max_distance,
            }
        )
        if "cosine" in f:
            flags["embedding"] = f["cosine"] >= self.embedding_threshold
        flags["any"] = flags.any(axis=1)
        return flags

    def shares(self, kind: str) -> dict[str, float]:
        """Share of test images with a near duplicate in train, per measure."""
        flags = self.near(kind)
        return {m: round(float(flags[m].mean()), 4) if len(flags) else 0.0 for m in flags}

    def report(self) -> dict[str, object]:
        ours = self.nearest["ours"]
        per_image = ours[["image", "dhash_train_image", "dhash_distance", "dihedral_train_image", "dihedral_distance"]]
        if "cosine" in ours:
            per_image = ours[[*per_image.columns, "embedding_train_image", "cosine"]].round({"cosine": 4})
        return {
            "near_dup_distance": self.max_distance,
            "embedding_threshold": self.embedding_threshold,
            "share_with_near_duplicate_in_train": {k: self.shares(k) for k in ("ours", "random")},
            "n_with_near_duplicate_in_train": {
                k: {m: int(v.sum()) for m, v in self.near(k).items()} for k in self.nearest
            },
            "n_test": {k: len(f) for k, f in self.nearest.items()},
            "random_split": "stratified by class, image by image, same ratios and seed, same images",
            "nearest_train": per_image.rename(
                columns={
                    "dhash_train_image": "nearest_train_dhash",
                    "dihedral_train_image": "nearest_train_dihedral",
                    "embedding_train_image": "nearest_train_embedding",
                }
            ).to_dict(orient="records"),
        }

    def summary(self) -> str:
        """One line for the stage's output."""
        ours, rnd = self.shares("ours"), self.shares("random")
        parts = [
            f"dihedral dHash <= {self.max_distance} bits: ours {ours['dihedral']:.1%}, random {rnd['dihedral']:.1%}"
        ]
        if "embedding" in ours:
            parts.append(
                f"cosine >= {self.embedding_threshold:g}: ours {ours['embedding']:.1%}, random {rnd['embedding']:.1%}"
            )
        return "leakage audit, test images with a near duplicate in train: " + "; ".join(parts)

    def curve(self) -> pd.DataFrame:
        """Share of test images whose nearest train image lies within ``distance`` bits (dihedral dHash)."""
        bits = np.arange(CURVE_BITS + 1)
        data = {"distance": bits}
        for kind, column in (("ours", "our_split"), ("random", "random_split")):
            d = self.nearest[kind]["dihedral_distance"].to_numpy()
            data[column] = [round(float((d <= b).mean()), 4) if len(d) else 0.0 for b in bits]
        return pd.DataFrame(data)

    def plot(self, path: Path) -> None:
        """Cumulative nearest-train distance (and similarity) of the test images, ours vs random, to a PNG."""
        from matplotlib.figure import Figure  # lazy: matplotlib takes ~0.5 s to import, only the plot needs it

        cosine = "cosine" in self.nearest["ours"]
        fig = Figure(figsize=(11 if cosine else 6, 4), layout="constrained")
        axes = fig.subplots(1, 2 if cosine else 1, squeeze=False)[0]
        curve = self.curve()
        ax = axes[0]
        ax.step(curve["distance"], curve["random_split"], where="post", label="random split")
        ax.step(curve["distance"], curve["our_split"], where="post", label="our split")
        ax.axvline(self.max_distance, color="grey", linestyle="--", label=f"near duplicate (<= {self.max_distance})")
        ax.set(xlabel="bits to the nearest train image (dHash, any flip / quarter turn)", ylabel="share of test images")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="upper left")
        if cosine:
            ax = axes[1]
            for kind, label in (("random", "random split"), ("ours", "our split")):
                s = np.sort(self.nearest[kind]["cosine"].to_numpy())[::-1]
                ax.step(s, np.arange(1, len(s) + 1) / max(len(s), 1), where="post", label=label)
            ax.axvline(self.embedding_threshold, color="grey", linestyle="--", label="threshold")
            ax.set(xlabel="cosine similarity to the nearest train image", ylabel="share of test images at or above")
            ax.invert_xaxis()
            ax.legend(loc="lower right")
        fig.suptitle("Leakage audit: how close test images come to train")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)


def audit_split(
    result: SplitResult,
    dihedral: np.ndarray,
    embeddings: np.ndarray | None,
    *,
    ratios: Mapping[str, float],
    seed: int,
    max_distance: int,
    embedding_threshold: float,
    names: pd.Series,
) -> LeakageAudit:
    """Audit ``result`` (rows index ``dihedral`` / ``embeddings`` / ``names``, the manifest's image names) and a
    random split of the same rows."""
    rows = np.concatenate([result.rows[s] for s in ratios])
    labels = pd.concat([result.frames[s]["label"] for s in ratios]).to_numpy()
    ours = np.concatenate([np.full(len(result.rows[s]), s, dtype=object) for s in ratios])
    rnd = random_split(labels, ratios, seed)
    name_of = np.asarray(names)
    nearest = {}
    for kind, assigned in (("ours", ours), ("random", rnd)):
        test, train = rows[assigned == "test"], rows[assigned == "train"]
        if len(train) == 0:
            raise ValueError("leakage audit: the train split is empty")
        f = nearest_train(test, train, dihedral, embeddings)
        f.insert(0, "image", name_of[f["test"]])
        for measure in ("dhash", "dihedral", "embedding"):
            if f"{measure}_train" in f:
                f[f"{measure}_train_image"] = name_of[f[f"{measure}_train"]]
        nearest[kind] = f
    return LeakageAudit(
        nearest=nearest,
        max_distance=max_distance,
        embedding_threshold=embedding_threshold if embeddings is not None else None,
    )
