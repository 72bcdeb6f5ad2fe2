"""Synthetic SEM demo data: determinism, layout, formats, data bar share, physical scale, argument checks,
atomicity."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from emassist.config.classes import CLASSES, NFFA_COUNTS
from emassist.config.settings import DemoParams, ParamsError, params_from_dict
from emassist.data.demo import class_counts, generate_demo
from emassist.data.demo import scenes as demo_scenes
from emassist.data.demo.__main__ import main as demo_main
from emassist.data.demo._raster import curve_joints, curve_line
from emassist.data.demo.generate import Job, image_rng, plan, render_image, true_pixel_size_nm
from tests.conftest import REPO_ROOT

NAME = re.compile(r"^L2_[0-9a-f]{32}\.(jpg|png|tif)$")
SMALL = DemoParams(n_images=60, width=64, height=64, seed=7, min_per_class=3, tif_fraction=0.2, databar_fraction=0.5)


def _generate(out: Path, workers: int = 0, **changes: Any) -> dict[str, int]:
    """generate_demo with SMALL's settings and ``changes``, checked first as load_params would."""
    demo = dataclasses.replace(SMALL, **changes)
    demo.check()
    return generate_demo(out, demo, workers=workers, progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _pixels(path: Path) -> np.ndarray:
    """Image as floats in [0, 1] whatever its bit depth."""
    with Image.open(path) as im:
        arr = np.asarray(im).astype(np.float64)
        return arr / (65535.0 if im.mode.startswith("I;16") else 255.0)


def _has_databar(path: Path) -> bool:
    """A black band at the bottom: in the last 15 % of rows, some row is (almost) entirely black.

    Scenes never have such a row: their black level is >= 0.03 and shot noise scatters it.
    """
    arr = _pixels(path)
    band = arr[-math.ceil(arr.shape[0] * 0.15) :]
    return bool((band < 0.06).mean(axis=1).max() > 0.8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("demo") / "raw"
    counts = _generate(out, n_images=100, workers=2)
    return out, counts


# ---------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(("n", "floor"), [(1000, 40), (100, 3), (137, 5), (400, 40), (10, 1), (5000, 1)])
def test_class_counts_follow_ratio_with_floor(n: int, floor: int) -> None:
    counts = class_counts(n, floor)
    assert tuple(counts) == CLASSES
    assert sum(counts.values()) == n
    assert min(counts.values()) >= floor
    above = [c for c in CLASSES if counts[c] > floor]
    at_floor = [c for c in CLASSES if counts[c] == floor]
    # classes held at the floor are the rarest ones in the real data
    if above and at_floor:
        assert max(NFFA_COUNTS[c] for c in at_floor) <= min(NFFA_COUNTS[c] for c in above)
    # the others share the rest in proportion to the real counts (within rounding)
    budget = n - floor * (len(CLASSES) - len(above))
    weight = sum(NFFA_COUNTS[c] for c in above)
    for c in above:
        assert abs(counts[c] - budget * NFFA_COUNTS[c] / weight) < 1.0, c


def test_class_counts_default_params_pinned() -> None:
    assert class_counts(1000, 40) == {
        "Biological": 42,
        "Fibres": 40,
        "Films_Coated_Surface": 40,
        "MEMS_devices_and_electrodes": 196,
        "Nanowires": 163,
        "Particles": 167,
        "Patterned_surface": 203,
        "Porous_Sponge": 40,
        "Powder": 40,
        "Tips": 69,
    }


def test_floor_takes_images_from_large_classes() -> None:
    plain = class_counts(1000, 1)
    floored = class_counts(1000, 40)
    assert plain["Fibres"] < 40 == floored["Fibres"]
    assert floored["Patterned_surface"] < plain["Patterned_surface"]
    assert floored["MEMS_devices_and_electrodes"] < plain["MEMS_devices_and_electrodes"]


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_for_any_worker_count(tmp_path: Path) -> None:
    a = _generate(tmp_path / "a", workers=1)
    b = _generate(tmp_path / "b", workers=2)
    assert a == b
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert len(ha) == SMALL.n_images
    assert ha == hb


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    _generate(tmp_path / "a", workers=2)
    _generate(tmp_path / "b", seed=8, workers=2)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert not set(ha) & set(hb)  # different names
    assert not set(ha.values()) & set(hb.values())  # and different contents


def test_every_renderer_works_at_odd_sizes() -> None:
    for ci in range(len(CLASSES)):
        for k, (w, h) in enumerate([(80, 48), (40, 96)]):
            img, _ = render_image(Job("unused", ci, k, "x.png", k == 1, w, h, 3))
            assert img.shape == (h, w) and img.dtype == np.float32
            assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
            assert img.std() > 0.02, CLASSES[ci]


def test_fast_tube_strokes_draw_pillows_pixels() -> None:
    """curve_line (joints computed once per tube) paints exactly what ImageDraw.line(joint="curve") paints."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(2, 30))
        steps = rng.normal(0, 1, (n, 2)) * rng.uniform(1, 8) + rng.uniform(-3, 3, 2)
        pts = [(float(x), float(y)) for x, y in (rng.uniform(0, 80, 2) + np.cumsum(steps, axis=0))]
        if trial % 5 == 0:  # straight runs (no joints) and repeated points
            pts = [pts[0], pts[0], (pts[0][0] + 10, pts[0][1]), (pts[0][0] + 20, pts[0][1])]
        for width in (1, 3, 5, 8, 9, 14, 23):
            ref = Image.new("F", (96, 96), 0.0)
            ImageDraw.Draw(ref).line(pts, fill=2.5, width=width, joint="curve")
            got = Image.new("F", (96, 96), 0.0)
            curve_line(ImageDraw.Draw(got), pts, 2.5, width, curve_joints(pts))
            assert np.array_equal(np.asarray(ref), np.asarray(got)), (trial, width)


def _histogram_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, bins: int = 40) -> float:
    """Test accuracy of the best classifier on one feature: the most frequent training class per histogram bin."""
    edges = np.linspace(x.min(), x.max() + 1e-9, bins + 1)
    b = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    labels = np.unique(y)
    hist = np.stack([np.bincount(b[train & (y == c)], minlength=bins) for c in labels]) + 0.5
    pred = labels[hist[:, b].argmax(axis=0)]
    return float((pred[~train] == y[~train]).mean())


def test_pixel_size_carries_each_class_physical_scale() -> None:
    """The pixel size is the class's nm per world unit over the scene's pixels per unit: within the class's range,
    the look-alike pairs apart, yet the pixel size alone far from classifying the ten classes."""
    counts = class_counts(4000, 330)
    jobs = plan(Path("unused"), counts, width=256, height=256, seed=42, tif_fraction=0.1, databar_fraction=0.8)
    y = np.array([j.class_index for j in jobs])
    size = np.array([j.pixel_size_nm for j in jobs])
    lo_zoom, hi_zoom = demo_scenes.MAG_RANGE
    for ci, cls in enumerate(CLASSES):
        lo, hi = demo_scenes.NM_PER_UNIT[cls]
        assert (size[y == ci] >= lo / hi_zoom).all() and (size[y == ci] <= hi / lo_zoom).all(), cls
    index = {c: CLASSES.index(c) for c in ("Nanowires", "Fibres", "Particles", "Powder")}
    assert size[y == index["Nanowires"]].max() < size[y == index["Fibres"]].min()
    assert size[y == index["Particles"]].max() < size[y == index["Powder"]].min()
    train = np.random.default_rng(0).random(len(y)) < 0.7
    accuracy = _histogram_accuracy(np.log10(size), y, train)
    assert 0.2 < accuracy < 0.6, accuracy  # informative, far from perfect (0.41 with the default demo)
    # twice the resolution, the same field of view: half the pixel size
    assert true_pixel_size_nm(42, 3, 5, 512, 512) == pytest.approx(true_pixel_size_nm(42, 3, 5, 256, 256) / 2)


def test_pixel_size_is_the_rendered_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """true_pixel_size_nm replays the rendering's own draw of pixels per unit (no rendering needed to know it)."""
    seen: list[float] = []
    for cls in ("Fibres", "Tips"):
        original = demo_scenes.RENDERERS[cls]

        def spy(rng: np.random.Generator, h: int, w: int, u: float, _orig: Any = original) -> Any:
            seen.append(u)
            return _orig(rng, h, w, u)

        monkeypatch.setitem(demo_scenes.RENDERERS, cls, spy)
    for cls, k, (w, h) in (("Fibres", 3, (256, 256)), ("Tips", 8, (300, 200))):
        ci = CLASSES.index(cls)
        render_image(Job("unused", ci, k, "x.png", False, w, h, 9))
        assert seen[-1] == demo_scenes.pixels_per_unit(image_rng(9, ci, k), h, w)  # the draw the truth replays
        lo, hi = demo_scenes.NM_PER_UNIT[cls]
        assert lo <= true_pixel_size_nm(9, ci, k, h, w) * seen[-1] <= hi


# ---------------------------------------------------------------------------------------------- layout & formats


def test_layout_matches_real_dataset(demo: tuple[Path, dict[str, int]]) -> None:
    out, counts = demo
    assert counts == class_counts(100, 3)
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASSES)  # class folders and nothing else
    for cls in CLASSES:
        files = sorted((out / cls).iterdir())
        assert len(files) == counts[cls]
        assert all(p.is_file() and NAME.match(p.name) for p in files), cls
    assert not list(out.parent.glob(".raw.*")), "temporary folder left behind"


def test_formats_and_bit_depths(demo: tuple[Path, dict[str, int]]) -> None:
    out, counts = demo
    by_ext: dict[str, list[Path]] = {"jpg": [], "png": [], "tif": []}
    for cls in CLASSES:
        files = list((out / cls).iterdir())
        n_tif = sum(p.suffix == ".tif" for p in files)
        assert n_tif == math.floor(counts[cls] * SMALL.tif_fraction + 0.5), cls  # same share in every class
        for p in files:
            by_ext[p.suffix[1:]].append(p)
    assert all(by_ext.values()), {k: len(v) for k, v in by_ext.items()}
    for p in by_ext["tif"]:
        with Image.open(p) as im:
            assert im.format == "TIFF" and im.mode == "I;16" and im.size == (64, 64)
            arr = np.asarray(im)
        assert arr.max() > 255 and np.any(arr % 257 != 0)  # really uses 16 bits
    for ext, fmt in (("jpg", "JPEG"), ("png", "PNG")):
        for p in by_ext[ext]:
            with Image.open(p) as im:
                assert im.format == fmt and im.mode == "L" and im.size == (64, 64)


def test_databar_share_and_independence_of_class(demo: tuple[Path, dict[str, int]]) -> None:
    out, counts = demo
    jobs = plan(out, counts, width=64, height=64, seed=7, tif_fraction=0.2, databar_fraction=0.5)
    detected = {j.name: _has_databar(out / j.class_name / j.name) for j in jobs}
    agree = sum(detected[j.name] == j.databar for j in jobs)
    assert agree == len(jobs)  # the detector sees exactly the planned bars
    expected = sum(math.floor(counts[c] * 0.5 + 0.5) for c in CLASSES)  # half of each class, rounded
    assert sum(detected.values()) == expected and abs(expected - 50) <= len(CLASSES) / 2
    for cls in CLASSES:  # every class gets the same share, so the bar tells nothing about the class
        planned = sum(j.databar for j in jobs if j.class_name == cls)
        assert planned == math.floor(counts[cls] * 0.5 + 0.5)


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (1.0, 20)])
def test_databar_fraction_extremes(tmp_path: Path, fraction: float, expected: int) -> None:
    _generate(tmp_path / "d", n_images=20, min_per_class=1, databar_fraction=fraction, workers=1)
    found = sum(_has_databar(p) for p in (tmp_path / "d").rglob("*.*"))
    assert found == expected


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"n_images": 29, "min_per_class": 3}, "n_images"),
        ({"n_images": 5}, "n_images"),
        ({"n_images": 60.0}, "n_images"),
        ({"min_per_class": 0}, "min_per_class"),
        ({"width": 16}, "width"),
        ({"height": 100_000}, "height"),
        ({"seed": -1}, "seed"),
        ({"tif_fraction": 1.5}, "tif_fraction"),
        ({"databar_fraction": -0.1}, "databar_fraction"),
        ({"workers": -2}, "workers"),
        ({"width": True}, "width"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path: Path, changes: dict[str, object], name: str) -> None:
    """A bad demo setting stops at load (the one validator, naming demo.<key>); workers is generate_demo's own."""
    if name == "workers":
        with pytest.raises(ValueError, match=rf"^{name}:"):
            _generate(tmp_path / "x", **changes)
    else:
        raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        raw["demo"] = {**dataclasses.asdict(SMALL), **changes}
        with pytest.raises(ParamsError, match=rf"^demo\.{name}:"):
            params_from_dict(raw)
    assert not (tmp_path / "x").exists()


def test_refuses_to_replace_a_folder_with_other_content(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(ValueError, match=r"^out_dir:"):
        _generate(out)
    assert (out / "thesis.tex").read_text() == "do not delete"


# ---------------------------------------------------------------------------------------------- atomicity


def _boom(*args: object) -> None:
    raise RuntimeError("renderer exploded")


def test_failure_midway_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(demo_scenes.RENDERERS, "Powder", _boom)  # a class in the middle of the run
    with pytest.raises(RuntimeError, match="exploded"):
        _generate(tmp_path / "out", workers=1)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder


def test_failure_keeps_previous_output_and_success_replaces_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _generate(out, workers=1)
    before = _hashes(out)
    with monkeypatch.context() as m:
        m.setitem(demo_scenes.RENDERERS, "Tips", _boom)
        with pytest.raises(RuntimeError):
            _generate(out, seed=99, workers=1)
    assert _hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _generate(out, seed=99, workers=1)
    after = _hashes(out)
    assert len(after) == SMALL.n_images and not set(after) & set(before)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = str(REPO_ROOT / "params.yaml")
    rc = demo_main(
        ["--out", str(tmp_path / "cli"), "--n", "20", "--min-per-class", "1", "--width", "48", "--params", params]
    )
    assert rc == 0
    assert len(list((tmp_path / "cli").rglob("L2_*"))) == 20
    with Image.open(next((tmp_path / "cli").rglob("L2_*"))) as im:
        assert im.size == (48, 256)
    assert "wrote 20 images" in capsys.readouterr().out


def test_cli_help_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--databar-fraction" in text
    assert (
        demo_main(["--out", str(tmp_path / "bad"), "--n", "5", "--quiet", "--params", str(REPO_ROOT / "params.yaml")])
        == 2
    )
    assert "n_images" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert "params.yaml" in text and "demo section" in text  # the defaults are the params file's


def test_cli_defaults_are_the_params_files_demo_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no overrides the CLI makes what `emassist demo` and the acquire stage make: params.yaml's demo section."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["demo"].update({"n_images": 20, "min_per_class": 2, "width": 40, "height": 36, "seed": 3})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert demo_main(["--out", str(tmp_path / "cli"), "--params", str(params), "--quiet", "--workers", "1"]) == 0
    files = sorted((tmp_path / "cli").rglob("L2_*"))
    assert len(files) == 20
    with Image.open(files[0]) as im:
        assert im.size == (40, 36)
    expected = generate_demo(tmp_path / "lib", params_from_dict(raw).demo, workers=1, progress=False)
    assert _hashes(tmp_path / "cli") == _hashes(tmp_path / "lib") and sum(expected.values()) == 20
    bad = tmp_path / "bad.yaml"
    raw["demo"]["tif_fraction"] = 2
    bad.write_text(yaml.safe_dump(raw))
    assert demo_main(["--out", str(tmp_path / "x"), "--params", str(bad), "--quiet"]) == 2
    assert "demo.tif_fraction" in capsys.readouterr().err
