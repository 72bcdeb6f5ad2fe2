"""Offline oversampling of rare train classes: counts, files, determinism, atomicity, validation."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from emassist.config.settings import ParamsError, PolicyParams, params_from_dict
from emassist.data import augment
from emassist.data.augment import oversample, write_augmented
from tests.conftest import REPO_ROOT
from tests.helpers import POLICY

SIZE = 32
ZERO_POLICY = {key: (False if key == "flip" else 0.0) for key in POLICY}
COUNTS = {"Big": 12, "Rare": 3, "Tiny": 1, "Exact": 8}
TARGET = 8


def _texture(rng: np.random.Generator) -> np.ndarray:
    """Asymmetric textured image: gradient + stripes + noise, so any transform shows."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    fx, fy = rng.uniform(0.3, 0.9, size=2)
    base = 40 + 4 * xx + 2 * yy + 40 * np.sin(fx * xx + fy * yy * yy / SIZE)
    return np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """A repo-like root with data/interim/images/<sha>.png and a train frame as the split stage writes it."""
    rng = np.random.default_rng(0)
    images = tmp_path / "data" / "interim" / "images"
    images.mkdir(parents=True)
    rows = []
    group = 0
    for label, n in COUNTS.items():
        for i in range(n):
            pixels = _texture(rng)
            sha = hashlib.sha256(pixels.tobytes()).hexdigest()
            Image.fromarray(pixels).save(images / f"{sha}.png")
            rows.append(
                {
                    "sha256": sha,
                    "label": label,
                    "image_path": f"data/interim/images/{sha}.png",
                    "source_path": f"data/raw/{label}/img_{i}.tif",
                    "group": group,
                }
            )
            group += 1
    return tmp_path, pd.DataFrame(rows)


def _run(root: Path, train: pd.DataFrame, out: str = "data/augmented", **kwargs) -> pd.DataFrame:
    options = {"target_per_class": TARGET, "seed": 7, "policy": POLICY, "root": root, "progress": False}
    options.update(kwargs)
    options["policy"] = PolicyParams(**options["policy"])  # a policy lists what it turns on (the rest is off)
    return oversample(train, root / out, **options)


def _load_augment(**augment: object) -> None:
    """params.yaml with these augment.* values through load's validation (the one place they are checked)."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["augment"].update(augment)
    params_from_dict(raw)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def test_rare_classes_reach_target_and_big_classes_are_untouched(workspace):
    root, train = workspace
    result = _run(root, train)

    counts = result["label"].value_counts().to_dict()
    assert counts == {"Big": 12, "Rare": TARGET, "Tiny": TARGET, "Exact": TARGET}
    new = result[result["augmented_from"] != ""]
    assert set(new["label"]) == {"Rare", "Tiny"}
    assert len(new) == (TARGET - 3) + (TARGET - 1)
    # The originals come first, unchanged and in order, with an empty augmented_from.
    originals = result.iloc[: len(train)]
    pd.testing.assert_frame_equal(originals.drop(columns="augmented_from"), train)
    assert (originals["augmented_from"] == "").all()
    assert list(result.columns) == [*train.columns, "augmented_from"]
    assert result["sha256"].is_unique


def test_new_rows_point_at_real_same_label_sources(workspace):
    root, train = workspace
    result = _run(root, train)
    by_sha = train.set_index("sha256")
    new = result[result["augmented_from"] != ""]
    for row in new.itertuples():
        source = by_sha.loc[row.augmented_from]
        assert row.label == source["label"]
        assert row.group == source["group"]
        assert row.source_path.startswith(source["source_path"] + "#aug")
        assert row.image_path == f"data/augmented/images/{row.sha256}.png"
    # The rare class cycles through all its sources, evenly.
    rare = new[new["label"] == "Rare"]["augmented_from"].value_counts()
    assert set(rare.index) == set(train.loc[train["label"] == "Rare", "sha256"])
    assert rare.max() - rare.min() <= 1
    # The single Tiny image gives copies #aug0..#aug6.
    tiny = new[new["label"] == "Tiny"]
    assert sorted(tiny["source_path"].str.rsplit("#", n=1).str[1]) == [f"aug{k}" for k in range(TARGET - 1)]


def test_new_files_exist_match_source_format_and_differ(workspace):
    root, train = workspace
    result = _run(root, train)
    new = result[result["augmented_from"] != ""]
    sources = train.set_index("sha256")["image_path"]
    for row in new.itertuples():
        path = root / row.image_path
        assert path.is_file()
        with Image.open(path) as im, Image.open(root / sources[row.augmented_from]) as src:
            assert im.size == src.size == (SIZE, SIZE)
            assert im.mode == src.mode == "L"
            assert not np.array_equal(np.asarray(im), np.asarray(src))
    files = sorted(p.name for p in (root / "data" / "augmented" / "images").iterdir())
    assert files == sorted(f"{sha}.png" for sha in new["sha256"])


def test_same_seed_is_reproducible_and_another_seed_differs(workspace):
    root, train = workspace

    def outputs(out: str, seed: int) -> tuple[pd.DataFrame, dict[str, bytes]]:
        frame = _run(root, train, out=out, seed=seed)
        images = root / out / "images"
        return frame, {p.name: p.read_bytes() for p in sorted(images.iterdir())}

    frame_a, files_a = outputs("aug_a", 7)
    frame_b, files_b = outputs("aug_b", 7)
    frame_c, files_c = outputs("aug_c", 8)
    assert files_a == files_b
    cols = ["sha256", "label", "source_path", "augmented_from"]
    pd.testing.assert_frame_equal(frame_a[cols], frame_b[cols])
    assert set(files_a).isdisjoint(files_c)  # ids depend on the seed
    assert set(frame_a["sha256"]) - set(train["sha256"]) != set(frame_c["sha256"]) - set(train["sha256"])
    assert sorted(files_a.values()) != sorted(files_c.values())


def test_zero_policy_copies_source_pixels(workspace):
    root, train = workspace
    result = _run(root, train, policy=ZERO_POLICY)
    sources = train.set_index("sha256")["image_path"]
    new = result[result["augmented_from"] != ""]
    assert len(new) == 12
    for row in new.itertuples():
        np.testing.assert_array_equal(_pixels(root / row.image_path), _pixels(root / sources[row.augmented_from]))


def test_missing_policy_keys_mean_off(workspace):
    root, train = workspace
    result = _run(root, train, policy={})
    sources = train.set_index("sha256")["image_path"]
    row = result[result["augmented_from"] != ""].iloc[0]
    np.testing.assert_array_equal(_pixels(root / row.image_path), _pixels(root / sources[row.augmented_from]))


def test_flip_only_gives_flipped_or_identical_copies(workspace):
    root, train = workspace
    result = _run(root, train, policy={"flip": True})
    sources = train.set_index("sha256")["image_path"]
    for row in result[result["augmented_from"] != ""].itertuples():
        got, src = _pixels(root / row.image_path), _pixels(root / sources[row.augmented_from])
        candidates = [src, src[:, ::-1], src[::-1, :], src[::-1, ::-1]]
        assert any(np.array_equal(got, c) for c in candidates)


def test_rot90_only_gives_quarter_turns_of_the_source(workspace):
    root, train = workspace
    result = _run(root, train, policy={"rot90": True})
    sources = train.set_index("sha256")["image_path"]
    turns = set()
    for row in result[result["augmented_from"] != ""].itertuples():
        got = _pixels(root / row.image_path).astype(int)
        src = _pixels(root / sources[row.augmented_from]).astype(int)
        errors = [int(np.abs(got - np.rot90(src, k)).max()) if got.shape == np.rot90(src, k).shape else 999
                  for k in range(4)]  # fmt: skip
        assert min(errors) <= 1, errors  # exact up to the interpolation's rounding
        turns.add(int(np.argmin(errors)))
    assert len(turns) >= 2, turns  # the number of turns is drawn per copy


def test_rotation_fills_corners_with_image_content(workspace):
    root, train = workspace
    white = np.full((SIZE, SIZE), 200, dtype=np.uint8)
    Image.fromarray(white).save(root / train.loc[train["label"] == "Tiny", "image_path"].iloc[0])
    result = _run(root, train, policy={"rotation": 0.1, "zoom": 0.1, "shear": 0.1})
    for row in result[(result["augmented_from"] != "") & (result["label"] == "Tiny")].itertuples():
        assert _pixels(root / row.image_path).min() == 200  # no black corners


def test_target_zero_or_already_met_adds_nothing(workspace):
    root, train = workspace
    result = _run(root, train, target_per_class=0)
    pd.testing.assert_frame_equal(result.drop(columns="augmented_from"), train)
    assert list((root / "data" / "augmented" / "images").iterdir()) == []


def test_negative_target_is_refused(workspace):
    root, _ = workspace
    with pytest.raises(ParamsError, match=r"augment\.target_per_class"):
        _load_augment(target_per_class=-1)
    assert not (root / "data" / "augmented").exists()


@pytest.mark.parametrize("policy", [{"rotation": -0.1}, {"zoom": 1.5}, {"flip": "yes"}, {"rot90": 1}, {"rotaton": 0.1}])
def test_bad_policy_is_refused(workspace, policy):
    with pytest.raises(ParamsError, match=r"augment\.policy"):
        _load_augment(policy=policy)


def test_missing_source_image_names_its_path(workspace):
    root, train = workspace
    missing = train.loc[train["label"] == "Rare", "image_path"].iloc[1]
    (root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        _run(root, train)
    assert not (root / "data" / "augmented").exists()


def test_failure_midway_leaves_no_out_dir(workspace, monkeypatch):
    root, train = workspace
    calls = {"n": 0}
    real = augment.augment_image

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(augment, "augment_image", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        _run(root, train)
    assert not (root / "data" / "augmented").exists()
    assert not any(p.name.startswith(".augmented") for p in (root / "data").iterdir())


def test_failure_midway_keeps_previous_out_dir(workspace, monkeypatch):
    root, train = workspace
    _run(root, train)
    before = sorted(p.name for p in (root / "data" / "augmented" / "images").iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(augment, "augment_image", broken)
    with pytest.raises(RuntimeError):
        _run(root, train, seed=99)
    assert sorted(p.name for p in (root / "data" / "augmented" / "images").iterdir()) == before


def test_write_augmented_writes_the_training_list(workspace):
    root, train = workspace
    splits = root / "data" / "splits"
    splits.mkdir(parents=True)
    train.to_csv(splits / "train.csv", index=False)
    out = write_augmented(
        splits / "train.csv",
        root / "data" / "augmented",
        target_per_class=TARGET,
        seed=7,
        policy=PolicyParams(**POLICY),
        root=root,
    )
    assert out == root / "data" / "augmented" / "train.csv"
    listed = pd.read_csv(out, keep_default_na=False)
    assert len(listed) == 12 + 3 * TARGET
    assert all((root / p).is_file() for p in listed["image_path"])
    expected = _run(root, train, out="again", progress=False)
    assert listed["sha256"].tolist() == expected["sha256"].tolist()
    assert listed["augmented_from"].tolist() == expected["augmented_from"].tolist()


def test_write_augmented_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train.csv"))):
        write_augmented(
            tmp_path / "train.csv", tmp_path / "out", target_per_class=5, seed=1, policy=PolicyParams(**POLICY)
        )


def test_augment_stage_writes_to_params_augmented_dir(workspace, monkeypatch, capsys):
    """stages/augment.py reads data.splits_dir/train.csv and writes data.augmented_dir (the folder training reads)."""
    from emassist.pipeline.stagerun import run_stage
    from stages import augment as augment_stage

    root, train = workspace
    (root / "data" / "splits").mkdir(parents=True)
    train.to_csv(root / "data" / "splits" / "train.csv", index=False)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"]["augmented_dir"] = "data/grown"
    raw["augment"]["target_per_class"] = TARGET
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(root)
    assert run_stage("augment", "", augment_stage.main, ["--params", "params.yaml"]) == 0, capsys.readouterr().err
    listed = pd.read_csv(root / "data" / "grown" / "train.csv", keep_default_na=False)
    assert len(listed) == 12 + 3 * TARGET
    assert all((root / p).is_file() for p in listed["image_path"])
    assert not (root / "data" / "augmented").exists()
