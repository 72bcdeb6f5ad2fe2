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


# --------------------------------------------------------------------------------------------- dihedral, embeddings


def _jpeg_roundtrip(gray: np.ndarray, quality: int = 85) -> np.ndarray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _image_manifest(n: int = 60, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    """Textured images with a flipped, a quarter-turned and a re-encoded (JPEG) copy of some; manifest + hashes."""
    from emassist.data.hashing import dhash
    from emassist.data.splitting import dihedral_hashes
    from tests.helpers import texture

    images: list[tuple[str, str, np.ndarray]] = []
    labels = ["Particles", "Fibres"]
    for i in range(n):
        label = labels[i % 2]
        g = texture(64, 64, seed=seed * 1000 + i)
        images.append((f"{label}/img_{i:03d}.png", label, g))
        if i % 6 == 0:
            images.append((f"{label}/flip_{i:03d}.png", label, np.ascontiguousarray(g[:, ::-1])))
            images.append((f"{label}/rot_{i:03d}.png", label, np.ascontiguousarray(np.rot90(g))))
            images.append((f"{label}/jpeg_{i:03d}.png", label, _jpeg_roundtrip(g)))
    rows = [(f"{k:064x}", path, label, dhash(g), f"images/{k:064x}.png") for k, (path, label, g) in enumerate(images)]
    frame = pd.DataFrame(rows, columns=["sha256", "source_path", "label", "dhash", "image_path"])
    hashes = np.stack([dihedral_hashes(g) for _, _, g in images])
    return frame, hashes, {path: k for k, (path, _, _) in enumerate(images)}


def test_dihedral_hashes_are_the_dhash_of_each_view() -> None:
    from emassist.data.hashing import dhash
    from emassist.data.splitting import dihedral_hashes, dihedral_views
    from tests.helpers import texture

    g = texture(40, 56, seed=3)
    views = dihedral_views(g)
    assert len({v.tobytes() + bytes(v.shape) for v in views}) == 8
    assert [f"{h:016x}" for h in dihedral_hashes(g).tolist()] == [dhash(np.ascontiguousarray(v)) for v in views]
    # The flipped image's views are the same set of hashes.
    assert set(dihedral_hashes(np.ascontiguousarray(g[:, ::-1])).tolist()) == set(dihedral_hashes(g).tolist())


def test_flipped_turned_and_reencoded_copies_land_in_one_group() -> None:
    frame, hashes, where = _image_manifest()
    plain = duplicate_groups(frame, 4)
    groups = duplicate_groups(frame, 4, dihedral=hashes)
    for i in range(0, 60, 6):
        label = ["Particles", "Fibres"][i % 2]
        copies = [where[f"{label}/{kind}_{i:03d}.png"] for kind in ("img", "flip", "rot", "jpeg")]
        assert len({groups[k] for k in copies}) == 1, i
        assert plain[copies[0]] == plain[copies[3]]  # the re-encoded copy: plain dHash already
    # Without the flips and turns the flipped copies are apart (the new links are what joins them).
    originals = [where[f"{['Particles', 'Fibres'][i % 2]}/img_{i:03d}.png"] for i in range(0, 60, 6)]
    flipped = [where[f"{['Particles', 'Fibres'][i % 2]}/flip_{i:03d}.png"] for i in range(0, 60, 6)]
    assert sum(plain[a] != plain[b] for a, b in zip(originals, flipped, strict=True)) >= 8
    result = split_manifest(frame, RATIOS, seed=0, near_dup_distance=4, dihedral=hashes)
    assert result.links["dihedral"] >= 20 and result.links["dhash"] >= 10
    assert result.n_groups == len(set(groups.tolist()))


def test_embedding_pairs_join_groups() -> None:
    frame, hashes, _ = _image_manifest(n=30)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(frame), 16))
    emb[5] = emb[1] * 2 + 0.01  # cosine ~1 between two otherwise unrelated images
    without = split_manifest(frame, RATIOS, seed=0, near_dup_distance=4, dihedral=hashes)
    result = split_manifest(frame, RATIOS, seed=0, near_dup_distance=4, dihedral=hashes, embeddings=emb)
    assert result.links["embedding"] == 1 and "embedding" not in without.links
    assert result.n_groups == without.n_groups - 1
    where = {sha: name for name, f in result.frames.items() for sha in f["sha256"]}
    assert where[frame["sha256"][1]] == where[frame["sha256"][5]]
    # rows map each split's rows back to the manifest.
    for name, f in result.frames.items():
        assert frame["sha256"].to_numpy()[result.rows[name]].tolist() == f["sha256"].tolist()


def test_misaligned_hashes_or_embeddings_are_refused() -> None:
    frame, hashes, _ = _image_manifest(n=12)
    with pytest.raises(ValueError, match="dihedral: need one row per manifest row"):
        split_manifest(frame, RATIOS, seed=0, near_dup_distance=4, dihedral=hashes[:-1])
    with pytest.raises(ValueError, match="embeddings: need one row per manifest row"):
        split_manifest(frame, RATIOS, seed=0, near_dup_distance=4, embeddings=np.ones(len(frame)))


def test_load_dihedral_hashes_reads_the_cached_pngs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from emassist.data.splitting import dihedral_hashes, load_dihedral_hashes
    from tests.helpers import texture

    grays = [texture(32, 32, seed=s) for s in range(3)]
    paths = []
    for k, g in enumerate(grays):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(g).save(paths[-1])
    loaded = load_dihedral_hashes(paths, identity=["00000000000000ff"] * 3)
    assert loaded[:, 0].tolist() == [255] * 3  # column 0 from the manifest
    np.testing.assert_array_equal(loaded[:, 1:], np.stack([dihedral_hashes(g) for g in grays])[:, 1:])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FileNotFoundError, match=r"bad\.png.*rerun the ingest stage"):
        load_dihedral_hashes([*paths, tmp_path / "bad.png"])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dihedral_hashes([tmp_path / "missing.png"])


# --------------------------------------------------------------------------------------------- leakage audit


def test_audit_random_split_finds_planted_duplicates_ours_finds_none() -> None:
    from emassist.data.leakage import audit_split

    frame, hashes, _ = _image_manifest(n=120, seed=1)
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(len(frame), 8))
    result = split_manifest(frame, RATIOS, seed=4, near_dup_distance=4, dihedral=hashes, embeddings=emb)
    audit = audit_split(result, hashes, emb, ratios=RATIOS, seed=4, max_distance=4, embedding_threshold=0.94,
                        names=frame["source_path"])  # fmt: skip
    ours, rnd = audit.shares("ours"), audit.shares("random")
    assert ours == {"dhash": 0.0, "dihedral": 0.0, "embedding": 0.0, "any": 0.0}
    assert rnd["dihedral"] > 0 and rnd["dihedral"] >= rnd["dhash"]
    near = audit.nearest["random"][audit.near("random")["dihedral"]]
    # Every near duplicate the random split leaks is one of the planted copies of the same original.
    for image, other in zip(near["image"], near["dihedral_train_image"], strict=True):
        assert image.split("_")[-1] == other.split("_")[-1], (image, other)
    report = audit.report()
    assert report["n_test"]["ours"] == len(result.frames["test"])
    assert {r["image"] for r in report["nearest_train"]} == set(result.frames["test"]["source_path"])
    assert all(r["nearest_train_dhash"] in set(result.frames["train"]["source_path"]) for r in report["nearest_train"])
    curve = audit.curve()
    assert curve["our_split"][4] == 0.0 and curve["random_split"][4] == rnd["dihedral"]
    assert "ours 0.0%" in audit.summary()


def test_random_split_keeps_the_ratios_per_class() -> None:
    from emassist.data.leakage import random_split

    labels = np.array(["a"] * 100 + ["b"] * 30)
    names = random_split(labels, RATIOS, seed=0)
    assert (names[:100] == "train").sum() == 70 and (names[100:] == "test").sum() == 3
    assert set(names.tolist()) == set(RATIOS)
