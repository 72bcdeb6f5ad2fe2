"""Corrections as training data (emassist.data.feedback): stored once by content, repeats add nothing, disagreeing
corrections leave the image out until resolved, bad input refused with a message; the acquire merge."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from emassist.data.feedback import (
    CONFLICT_DIR,
    FeedbackError,
    correct,
    find_corrected,
    merge_feedback,
    resolve,
    sha256_of,
    stored_files,
    summarize,
)
from emassist.data.predlog import PredictionLog, PredictionRow
from tests.helpers import encode, texture

CLASSES = ["Fibres", "Nanowires", "Particles"]


@pytest.fixture
def store(tmp_path: Path) -> PredictionLog:
    return PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")


def _tiff(seed: int = 0) -> bytes:
    return encode(texture(40, 48, seed=seed), "TIFF")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_correction_stores_the_original_bytes_once_and_logs_a_row(store: PredictionLog, tmp_path: Path) -> None:
    data = _tiff()
    sha = sha256_of(data)
    fb = tmp_path / "feedback"
    done = correct(store, sha, "Nanowires", classes=CLASSES, feedback_dir=fb, who="Ada", image_bytes=data,
                   ext="tif", model_version="3", old_label="Fibres")  # fmt: skip
    assert done.status == "stored" and done.path == fb / "Nanowires" / f"{sha}.tif"
    assert done.path.read_bytes() == data  # the original bytes, TIFF tags and all
    rows = store.corrections()
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row.sha256, row.new_label, row.old_label, row.who, row.model_version, row.status) == (
        sha, "Nanowires", "Fibres", "Ada", "3", "ok")  # fmt: skip
    assert row.stored_path == done.path.as_posix()
    assert "corrected to Nanowires" in done.message()


def test_the_same_correction_twice_is_one_file_and_one_row(store: PredictionLog, tmp_path: Path) -> None:
    data = _tiff(1)
    sha = sha256_of(data)
    fb = tmp_path / "feedback"
    first = correct(store, sha, "Particles", classes=CLASSES, feedback_dir=fb, who="Ada", image_bytes=data)
    again = correct(store, sha, "Particles", classes=CLASSES, feedback_dir=fb, who="Bob", image_bytes=data)
    without_bytes = correct(store, sha, "Particles", classes=CLASSES, feedback_dir=fb)  # the stored copy suffices
    assert first.status == "stored" and again.status == without_bytes.status == "repeat"
    assert again.row_id is None and "nothing new" in again.message()
    assert len(store.corrections()) == 1 and store.corrections().iloc[0].who == "Ada"  # the first one stands
    assert _files(fb) == [f"Particles/{sha}.tif"]  # extension from the content when none is given


def test_a_contradicting_correction_keeps_both_and_leaves_the_image_out_until_resolved(
    store: PredictionLog, tmp_path: Path
) -> None:
    data = encode(texture(32, 32, seed=2), "PNG")
    sha = sha256_of(data)
    fb = tmp_path / "feedback"
    correct(store, sha, "Fibres", classes=CLASSES, feedback_dir=fb, who="Ada", image_bytes=data, ext="png")
    clash = correct(store, sha, "Nanowires", classes=CLASSES, feedback_dir=fb, who="Bob", image_bytes=data, ext="png")
    assert clash.status == "conflicting" and clash.labels == ("Fibres", "Nanowires")
    assert "emassist feedback resolve" in clash.message()
    rows = store.corrections()
    assert list(rows.new_label) == ["Fibres", "Nanowires"] and set(rows.status) == {"conflicting"}  # both kept
    assert _files(fb) == [f"{CONFLICT_DIR}/{sha}.png"]  # in no class folder: not merged into training
    # a third vote for a label already given: a repeat, still conflicting
    assert correct(store, sha, "Fibres", classes=CLASSES, feedback_dir=fb).status == "repeat"
    listed = summarize(store, fb)
    assert [(i.sha256, i.status, i.label, i.labels, i.who) for i in listed] == [
        (sha, "conflicting", "", ["Fibres", "Nanowires"], ["Ada", "Bob"])]  # fmt: skip
    raw = tmp_path / "raw"
    report = merge_feedback(fb, raw, CLASSES)
    assert report.n_merged == 0 and report.conflicting == 1 and not raw.exists()

    done = resolve(store, sha[:10] + sha[10:], "Nanowires", classes=CLASSES, feedback_dir=fb, who="Cy")
    assert done.status == "resolved" and done.path == fb / "Nanowires" / f"{sha}.png"
    assert _files(fb) == [f"Nanowires/{sha}.png"]
    rows = store.corrections()
    assert set(rows.status) == {"ok"} and rows.iloc[-1].new_label == "Nanowires" and rows.iloc[-1].who == "Cy"
    assert summarize(store, fb)[0].label == "Nanowires"
    assert correct(store, sha, "Nanowires", classes=CLASSES, feedback_dir=fb).status == "repeat"
    assert merge_feedback(fb, raw, CLASSES).per_class == {"Nanowires": 1}


def test_unknown_class_is_refused_naming_the_known_ones(store: PredictionLog, tmp_path: Path) -> None:
    data = _tiff(3)
    with pytest.raises(FeedbackError, match=r"unknown class 'Nanotubes' \(the known classes: Fibres, Nanowires"):
        correct(store, sha256_of(data), "Nanotubes", classes=CLASSES, feedback_dir=tmp_path, image_bytes=data)
    assert len(store.corrections()) == 0 and not any(tmp_path.rglob("*.tif"))


def test_unknown_sha256_without_a_file_is_refused(store: PredictionLog, tmp_path: Path) -> None:
    sha = sha256_of(b"never seen")
    with pytest.raises(FeedbackError, match=r"unknown sha256 .*never logged, never corrected, and no file given"):
        correct(store, sha, "Fibres", classes=CLASSES, feedback_dir=tmp_path)
    with pytest.raises(FeedbackError, match="not a sha256"):
        correct(store, "xyz", "Fibres", classes=CLASSES, feedback_dir=tmp_path)
    # logged (say by the page) but its bytes are not here: a different message, saying what to do
    store.write([PredictionRow(source="web", sha256=sha, label="Fibres", confidence=0.9,
                               probabilities={"Fibres": 0.9}, needs_review=False)])  # fmt: skip
    with pytest.raises(FeedbackError, match="was logged, but its bytes are not here: give the file"):
        correct(store, sha, "Particles", classes=CLASSES, feedback_dir=tmp_path)
    with pytest.raises(FeedbackError, match="no corrections to resolve"):
        resolve(store, sha, "Fibres", classes=CLASSES, feedback_dir=tmp_path)
    assert len(store.corrections()) == 0


def test_bytes_that_do_not_match_the_sha256_are_refused(store: PredictionLog, tmp_path: Path) -> None:
    data = _tiff(4)
    with pytest.raises(FeedbackError, match=r"do not match sha256 .* they hash to"):
        correct(store, sha256_of(b"other"), "Fibres", classes=CLASSES, feedback_dir=tmp_path, image_bytes=data)
    path = tmp_path / "a.tif"
    path.write_bytes(data)
    done = correct(store, sha256_of(data), "Fibres", classes=CLASSES, feedback_dir=tmp_path / "fb", path=path)
    assert done.path.name == f"{sha256_of(data)}.tif"
    with pytest.raises(FeedbackError, match="not an image"):
        text = b"not an image at all"
        correct(store, sha256_of(text), "Fibres", classes=CLASSES, feedback_dir=tmp_path, image_bytes=text)
    assert len(store.corrections()) == 1


def test_find_corrected_by_prefix(store: PredictionLog, tmp_path: Path) -> None:
    shas = []
    for seed in (5, 6):
        data = _tiff(seed)
        shas.append(sha256_of(data))
        correct(store, shas[-1], "Fibres", classes=CLASSES, feedback_dir=tmp_path, image_bytes=data)
    assert find_corrected(store, shas[0][:8].upper()) == [shas[0]]
    assert find_corrected(store, "") == [] and find_corrected(store, shas[1]) == [shas[1]]
    assert find_corrected(store, "g") == []


def test_merge_copies_class_folders_under_names_that_cannot_collide(tmp_path: Path) -> None:
    fb, raw = tmp_path / "feedback", tmp_path / "raw"
    a, b = _tiff(7), encode(texture(30, 30, seed=8), "PNG")
    (fb / "Fibres").mkdir(parents=True)
    (fb / "Fibres" / f"{sha256_of(a)}.tif").write_bytes(a)
    (fb / "Particles").mkdir()
    (fb / "Particles" / f"{sha256_of(b)}.png").write_bytes(b)
    (fb / "Particles" / "notes.txt").write_text("not feedback")
    (fb / "Nanotubes").mkdir()  # not a class of this params
    (fb / "README.md").write_text("in git")
    (raw / "Fibres").mkdir(parents=True)
    (raw / "Fibres" / "img001.tif").write_bytes(_tiff(9))
    report = merge_feedback(fb, raw, CLASSES)
    assert report.per_class == {"Fibres": 1, "Particles": 1}
    assert sorted(report.skipped) == [
        "Nanotubes/ (not in data.classes)",
        "Particles/notes.txt (not named <sha256>.<ext>)",
    ]
    assert _files(raw) == sorted(["Fibres/img001.tif", f"Fibres/feedback_{sha256_of(a)}.tif",
                                  f"Particles/feedback_{sha256_of(b)}.png"])  # fmt: skip
    assert (raw / "Fibres" / f"feedback_{sha256_of(a)}.tif").read_bytes() == a
    assert "2 corrected images merged" in report.summary()
    assert merge_feedback(tmp_path / "absent", raw, CLASSES).summary() == "feedback: no corrected images"


def test_merge_replaces_a_source_file_the_correction_relabels(tmp_path: Path) -> None:
    """The same bytes under the source's label and the correction's: the correction wins (else the split would drop
    both as conflicting); a correction agreeing with the source leaves it."""
    fb, raw = tmp_path / "feedback", tmp_path / "raw"
    wrong, right = _tiff(10), _tiff(11)
    for cls, name, data in [
        ("Fibres", "w.tif", wrong),
        ("Particles", "r.tif", right),
        ("Particles", "x.tif", _tiff(12)),
    ]:
        (raw / cls).mkdir(parents=True, exist_ok=True)
        (raw / cls / name).write_bytes(data)
    for cls, data in [("Nanowires", wrong), ("Particles", right)]:
        (fb / cls).mkdir(parents=True, exist_ok=True)
        (fb / cls / f"{sha256_of(data)}.tif").write_bytes(data)
    report = merge_feedback(fb, raw, CLASSES)
    assert report.relabelled == ["Fibres/w.tif"]
    assert not (raw / "Fibres" / "w.tif").exists() and (raw / "Particles" / "r.tif").exists()
    with open(raw / "_rejected_upstream.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"source_path": "Fibres/w.tif", "label": "Fibres",
                     "reason": f"relabelled by a correction: Nanowires/feedback_{sha256_of(wrong)[:12]}…"}]  # fmt: skip
    assert stored_files(fb, sha256_of(wrong)) == [fb / "Nanowires" / f"{sha256_of(wrong)}.tif"]


# ------------------------------------------------------------------------------------------------ dvc repro


@pytest.mark.slow
def test_dvc_repro_merges_corrections_into_the_manifest_and_keeps_near_duplicates_together(tmp_path: Path) -> None:
    """In a fresh copy of the repository: corrections made with :func:`correct`, then ``dvc repro split``. An exact
    copy of a source image relabelled -> in the manifest under its new class, the source file quarantined; re-encoded
    copies (near duplicates) of source images, corrected -> each in the same split as its original."""
    import io
    import os
    import subprocess
    import sys

    import pandas as pd
    from PIL import Image

    from emassist.config.settings import params_from_dict
    from emassist.data.demo import generate_demo
    from tests.helpers import copy_repo

    tiny = {"demo": {"n_images": 60, "width": 64, "height": 64, "min_per_class": 5}, "ingest": {"cache_size": 32},
            "validate": {"min_per_class": 3}, "train": {"image_size": 32}}  # fmt: skip
    repo = copy_repo(tmp_path / "repo", overrides=tiny, site_cache=True)
    params = params_from_dict(yaml_load(repo / "params.yaml"))
    preview = tmp_path / "preview"  # the demo images acquire will write (deterministic)
    generate_demo(preview, params.demo)
    sources = sorted(p for p in preview.rglob("*") if p.is_file())
    store = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")
    fb = repo / params.monitoring.feedback_dir
    classes = params.data.classes

    relabel = sources[0]
    old_class = relabel.parent.name
    new_class = next(c for c in classes if c != old_class)
    data = relabel.read_bytes()
    correct(store, sha256_of(data), new_class, classes=classes, feedback_dir=fb, image_bytes=data, ext=relabel.suffix)
    near: dict[str, str] = {}  # sha256 of the corrected copy -> sha256 of its source
    for src in sources[1::11][:5]:
        buf = io.BytesIO()
        with Image.open(src) as im:
            im.save(buf, format="PNG", compress_level=9)  # the same pixels, other bytes
        copy = buf.getvalue()
        assert sha256_of(copy) != sha256_of(src.read_bytes())
        label = next(c for c in classes if c != src.parent.name)
        correct(store, sha256_of(copy), label, classes=classes, feedback_dir=fb, image_bytes=copy)
        near[sha256_of(copy)] = sha256_of(src.read_bytes())

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.run([sys.executable, "-m", "dvc", "repro", "split"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"feedback: {1 + len(near)} corrected images merged" in run.stdout
    manifest = pd.read_parquet(repo / "data/interim/manifest.parquet")
    rejected = pd.read_csv(repo / "data/interim/rejected.csv")
    sha = sha256_of(data)
    row = manifest[manifest["sha256"] == sha]
    assert list(row["label"]) == [new_class], row  # only the corrected copy: the source file was replaced
    assert row["source_path"].iloc[0] == f"{new_class}/feedback_{sha}{relabel.suffix}"
    quarantined = rejected[rejected["source_path"] == f"{old_class}/{relabel.name}"]
    assert quarantined["reason"].iloc[0].startswith("relabelled by a correction"), rejected
    split_of = {}
    for name in ("train", "val", "test"):
        for s in pd.read_csv(repo / f"data/splits/{name}.csv")["sha256"]:
            split_of[s] = name
    assert split_of[sha] in ("train", "val", "test")
    for copy_sha, src_sha in near.items():
        assert copy_sha in set(manifest["sha256"]) and split_of[copy_sha] == split_of[src_sha], (copy_sha, split_of)

    again = subprocess.run([sys.executable, "-m", "dvc", "status", "acquire"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "changed deps" not in again.stdout, again.stdout
    extra = sources[2].read_bytes()
    correct(store, sha256_of(extra), new_class, classes=classes, feedback_dir=fb, image_bytes=extra)
    changed = subprocess.run([sys.executable, "-m", "dvc", "status", "acquire"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "data/feedback" in changed.stdout and "modified" in changed.stdout, changed.stdout


def yaml_load(path: Path) -> dict:  # type: ignore[type-arg]
    import yaml

    return yaml.safe_load(path.read_text())
