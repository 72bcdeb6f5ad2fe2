from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emassist.data.splitting import duplicate_groups, near_duplicate_pairs, split_manifest

RATIOS = {"train": 0.7, "val": 0.2, "test": 0.1}


def _random_hash(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))


def _flip(h: int, bits: list[int]) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def _manifest(seed: int = 0) -> pd.DataFrame:
    """Synthetic manifest: unbalanced classes, exact duplicates and near-duplicate clusters."""
    rng = np.random.default_rng(seed)
    rows = []
    sizes = {"Particles": 300, "Nanowires": 200, "Fibres": 30, "Tips": 60}
    for label, n in sizes.items():
        for i in range(n):
            h = _random_hash(rng)
            sha = f"{rng.integers(0, 2**62):064x}"
            rows.append((sha, f"{label}/img_{i}.png", label, f"{h:016x}"))
            if i % 10 == 0:  # an exact duplicate file under another name
                rows.append((sha, f"{label}/copy_{i}.png", label, f"{h:016x}"))
            if i % 7 == 0:  # a near-duplicate cluster of three
                for k in range(3):
                    near = _flip(h, rng.choice(64, size=2, replace=False).tolist())
                    rows.append((f"{rng.integers(0, 2**62):064x}", f"{label}/near_{i}_{k}.png", label, f"{near:016x}"))
    return pd.DataFrame(rows, columns=["sha256", "source_path", "label", "dhash"]).assign(
        image_path=lambda f: "images/" + f["sha256"] + ".png"
    )


def test_near_duplicate_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    base = [_random_hash(rng) for _ in range(50)]
    hashes = base + [_flip(h, [3, 17]) for h in base[:10]] + [_flip(base[0], list(range(10)))]
    hexes = [f"{h:016x}" for h in hashes]
    found = set(near_duplicate_pairs(hexes, 4, chunk=7))
    expected = {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(hashes[i] ^ hashes[j]).count("1") <= 4
    }
    assert found == expected
    assert (0, 50) in found and (0, 60) not in found


def test_groups_never_straddle_splits_and_proportions_hold() -> None:
    manifest = _manifest()
    result = split_manifest(manifest, RATIOS, seed=3, near_dup_distance=4)
    frames = result.frames
    split_of_group: dict[int, str] = {}
    for name, frame in frames.items():
        for g in frame["group"]:
            assert split_of_group.setdefault(g, name) == name, f"group {g} straddles splits"
    # Every sha256 is in exactly one split, once.
    all_sha = pd.concat([f["sha256"] for f in frames.values()])
    assert all_sha.is_unique
    assert set(all_sha) == set(manifest["sha256"])
    assert result.n_exact_duplicates_dropped == (manifest.duplicated("sha256")).sum()
    assert result.n_duplicate_groups >= 40
    # Class proportions within 3 percentage points of the targets.
    counts = result.counts()
    for label, row in counts.iterrows():
        for name, ratio in RATIOS.items():
            assert abs(row[name] / row["total"] - ratio) < 0.03, (label, name, row.to_dict())


def test_near_duplicates_land_together() -> None:
    manifest = _manifest()
    result = split_manifest(manifest, RATIOS, seed=0, near_dup_distance=4)
    where = {sha: name for name, f in result.frames.items() for sha in f["sha256"]}
    by_path = manifest.drop_duplicates("sha256").set_index("source_path")["sha256"]
    for path, sha in by_path.items():
        if "/near_" in path:
            i = path.split("near_")[1].split("_")[0]
            label = path.split("/")[0]
            assert where[sha] == where[by_path[f"{label}/img_{i}.png"]]


def test_split_is_deterministic_per_seed() -> None:
    manifest = _manifest()
    a = split_manifest(manifest, RATIOS, seed=5, near_dup_distance=4)
    b = split_manifest(manifest.sample(frac=1, random_state=1), RATIOS, seed=5, near_dup_distance=4)
    c = split_manifest(manifest, RATIOS, seed=6, near_dup_distance=4)
    assert all(a.frames[s]["sha256"].tolist() == b.frames[s]["sha256"].tolist() for s in RATIOS)
    assert any(a.frames[s]["sha256"].tolist() != c.frames[s]["sha256"].tolist() for s in RATIOS)


def test_conflicting_labels_are_dropped_and_reported() -> None:
    manifest = _manifest()
    dup = manifest.iloc[[0]].assign(source_path="Tips/same_bytes.png", label="Tips")
    result = split_manifest(pd.concat([manifest, dup]), RATIOS, seed=0, near_dup_distance=4)
    assert result.conflicting_labels == [manifest.iloc[0]["sha256"]]
    assert manifest.iloc[0]["sha256"] not in set(pd.concat([f["sha256"] for f in result.frames.values()]))


@pytest.mark.parametrize("distance", [0, 4])
def test_duplicate_groups_distance_zero_only_exact(distance: int) -> None:
    frame = pd.DataFrame(
        {"sha256": ["a", "b", "a"], "dhash": ["00000000000000ff", "00000000000000fe", "0000000000000000"]}
    )
    groups = duplicate_groups(frame, distance)
    assert groups[0] == groups[2]
    assert (groups[0] == groups[1]) == (distance >= 1)
