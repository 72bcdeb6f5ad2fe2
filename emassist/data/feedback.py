"""Corrections become training data: a microscopist's "this is really Nanowires" stores the image once and logs it.

Layout of ``monitoring.feedback_dir`` (``data/feedback``; each class folder DVC-tracked by ``emassist feedback
commit``, the folder itself kept in git with its README so a fresh clone has it):

* ``<Class>/<sha256>.<ext>``: the ORIGINAL bytes of a corrected image (TIFF tags survive), named by the sha256 of
  those bytes (as ingest computes it), so an image is stored once however often it is corrected.
* ``_conflicting/<sha256>.<ext>``: an image that two corrections label differently. It is in no class folder, so
  the acquire stage leaves it out of training until ``emassist feedback resolve`` gives it one label.

Rules (:func:`correct`):

* the class must be one of ``classes``; the bytes must hash to the sha256 given;
* the same correction again (same image, a label it already has) is a *repeat*: no second row, no second file
  (the first correction, its ``who`` and time, stands);
* a correction whose label differs from the image's current one is *conflicting*: its row is added, every
  correction of that image is marked ``conflicting`` and the file moves to ``_conflicting/``;
* :func:`resolve` adds a row with the chosen label, marks them all ``ok`` again and moves the file into that class.

:func:`merge_feedback` is the acquire stage's part: ``<Class>/*`` copied into ``raw_dir/<Class>/feedback_<name>``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emassist.core.atomic import atomic_write_bytes
from emassist.data.hashing import sha256_of
from emassist.data.ingest import REJECTED_COLUMNS, UPSTREAM_REJECTED_FILE
from emassist.data.predlog import PredictionLog

CONFLICT_DIR = "_conflicting"
MERGED_PREFIX = "feedback_"  # raw_dir/<Class>/feedback_<sha256>.<ext>: cannot collide with a source's own names
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_STORED_RE = re.compile(r"^([0-9a-f]{64})\.([a-z0-9]{1,5})$")
_EXT_BY_FORMAT = {"TIFF": "tif", "PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif", "WEBP": "webp"}


class FeedbackError(ValueError):
    """A correction that cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class Correction:
    """What :func:`correct` or :func:`resolve` did.

    ``status``: ``stored`` (a new correction), ``repeat`` (already corrected to that label: nothing new),
    ``conflicting`` (the image now has two labels and is left out of training), ``resolved``.
    """

    sha256: str
    label: str
    status: str
    path: Path  # where the image's bytes are now
    row_id: int | None  # the corrections row added (None for a repeat)
    labels: tuple[str, ...] = ()  # every label the image's corrections carry

    def message(self) -> str:
        short = self.sha256[:12]
        if self.status == "repeat":
            return f"{short} is already corrected to {self.label}: nothing new stored ({self.path})"
        if self.status == "conflicting":
            return (f"{short}: corrections disagree ({', '.join(self.labels)}): the image is marked conflicting and "
                    f"left out of training ({self.path}); resolve it with `emassist feedback resolve {short} "
                    f"--label CLASS`")  # fmt: skip
        if self.status == "resolved":
            return f"{short} resolved as {self.label}: {self.path} (correction #{self.row_id})"
        return f"{short} corrected to {self.label}: stored {self.path} (correction #{self.row_id})"


def check_class(label: str, classes: Sequence[str]) -> None:
    if label not in classes:
        raise FeedbackError(f"unknown class {label!r} (the known classes: {', '.join(classes)})")


def check_sha256(sha256: str) -> str:
    value = sha256.strip().lower()
    if not _SHA_RE.match(value):
        raise FeedbackError(f"not a sha256 (64 hex digits): {sha256!r}")
    return value


def image_ext(data: bytes, hint: str | None = None) -> str:
    """The file extension to store ``data`` under: ``hint`` (a suffix or a name's) when it is a plain one, else from
    the content (Pillow's format). Bytes Pillow cannot open and no hint: :class:`FeedbackError`."""
    if hint:
        ext = hint.rsplit(".", 1)[-1].strip().lower()
        ext = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)
        if re.fullmatch(r"[a-z0-9]{1,5}", ext):
            return ext
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = str(im.format or "")
    except (UnidentifiedImageError, OSError) as exc:
        raise FeedbackError(f"not an image Pillow can open ({exc}); only images can be corrected") from exc
    return _EXT_BY_FORMAT.get(fmt, fmt.lower()[:5] or "bin")


def stored_files(feedback_dir: Path, sha256: str) -> list[Path]:
    """Every stored file of one image (normally one), in any class folder or ``_conflicting``."""
    root = Path(feedback_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"*/{sha256}.*") if p.is_file() and _STORED_RE.match(p.name))


def _place(feedback_dir: Path, sha256: str, folder: str, data: bytes | None, ext: str | None) -> Path:
    """The image's one file, in ``feedback_dir/folder/``: moved there if stored elsewhere, else written from
    ``data`` (atomically). Extra copies (another extension, another folder) are removed."""
    existing = stored_files(feedback_dir, sha256)
    target_dir = Path(feedback_dir) / folder
    if existing:
        keep = next((p for p in existing if p.parent == target_dir), existing[0])
        target = target_dir / keep.name
        if keep != target:
            target_dir.mkdir(parents=True, exist_ok=True)
            os.replace(keep, target)
        for extra in existing:
            if extra != keep and extra.exists():
                extra.unlink()
        return target
    if data is None or ext is None:
        raise FeedbackError(f"no stored copy of {sha256[:12]} in {feedback_dir} and no bytes given")
    target = target_dir / f"{sha256}.{ext}"
    atomic_write_bytes(target, data)
    return target


def _image_state(store: PredictionLog, sha256: str) -> tuple[Any, str, str]:
    """(the image's corrections, its status ``ok``/``conflicting``/``""`` when none, its current label or "")."""
    rows = store.corrections(sha256=sha256)
    if not len(rows):
        return rows, "", ""
    status = "conflicting" if (rows["status"] == "conflicting").any() else "ok"
    return rows, status, "" if status == "conflicting" else str(rows["new_label"].iloc[-1])


def correct(
    store: PredictionLog,
    sha256: str,
    new_label: str,
    *,
    classes: Sequence[str],
    feedback_dir: str | Path,
    who: str = "",
    image_bytes: bytes | None = None,
    path: str | Path | None = None,
    ext: str | None = None,
    model_version: str = "",
    old_label: str = "",
) -> Correction:
    """Record that image ``sha256`` is really ``new_label`` (see the module's rules). The bytes come from
    ``image_bytes``, else the file at ``path``, else an earlier stored copy; an image that was never logged, never
    stored and comes without bytes is refused, as are bytes that do not hash to ``sha256``."""
    check_class(new_label, classes)
    sha = check_sha256(sha256)
    feedback_dir = Path(feedback_dir)
    if image_bytes is None and path is not None:
        try:
            image_bytes = Path(path).read_bytes()
        except OSError as exc:
            raise FeedbackError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if image_bytes is not None:
        actual = sha256_of(image_bytes)
        if actual != sha:
            raise FeedbackError(f"the bytes given do not match sha256 {sha[:12]}…: they hash to {actual[:12]}… "
                                "(a different or changed file)")  # fmt: skip
        ext = image_ext(image_bytes, ext or (Path(path).suffix if path is not None else None))
    elif not stored_files(feedback_dir, sha):
        if len(store.predictions(sha256=sha)):
            raise FeedbackError(f"image {sha[:12]} was logged, but its bytes are not here: give the file "
                                "(emassist correct PATH --label CLASS)")  # fmt: skip
        raise FeedbackError(f"unknown sha256 {sha[:12]}…: never logged, never corrected, and no file given")

    rows, status, current = _image_state(store, sha)
    labels = tuple(dict.fromkeys(str(x) for x in rows["new_label"])) if len(rows) else ()
    if new_label in labels and (status == "conflicting" or new_label == current):
        folder = CONFLICT_DIR if status == "conflicting" else new_label
        return Correction(sha, new_label, "repeat", _place(feedback_dir, sha, folder, image_bytes, ext), None, labels)
    if status:  # corrected before, to another label: both kept, the image left out of training until resolved
        existing = stored_files(feedback_dir, sha)
        target = feedback_dir / CONFLICT_DIR / (existing[0].name if existing else f"{sha}.{ext}")
        row_id = store.add_correction(sha, new_label, old_label=old_label, who=who, model_version=model_version,
                                      stored_path=target.as_posix(), status="conflicting")  # fmt: skip
        store.set_correction_status(sha, "conflicting")  # the rows first: a log that is down changes no file
        target = _place(feedback_dir, sha, CONFLICT_DIR, image_bytes, ext)
        return Correction(sha, new_label, "conflicting", target, row_id, (*labels, new_label))
    had_file = bool(stored_files(feedback_dir, sha))
    target = _place(feedback_dir, sha, new_label, image_bytes, ext)
    try:
        row_id = store.add_correction(sha, new_label, old_label=old_label, who=who, model_version=model_version,
                                      stored_path=target.as_posix())  # fmt: skip
    except Exception:  # the log is down: no file without its row (it would be trained on, unexplained)
        if not had_file:
            target.unlink(missing_ok=True)
        raise
    return Correction(sha, new_label, "stored", target, row_id, (new_label,))


def resolve(
    store: PredictionLog,
    sha256: str,
    label: str,
    *,
    classes: Sequence[str],
    feedback_dir: str | Path,
    who: str = "",
) -> Correction:
    """Give a corrected image one label: a row with ``label``, every correction of it ``ok`` again, the file moved
    into ``label``'s folder (so the next acquire merges it). Works on a conflicting image and on an ``ok`` one."""
    check_class(label, classes)
    sha = check_sha256(sha256)
    rows, status, _ = _image_state(store, sha)
    if not status:
        raise FeedbackError(f"{sha[:12]} has no corrections to resolve (see `emassist feedback list`)")
    if not stored_files(Path(feedback_dir), sha):
        raise FeedbackError(f"{sha[:12]}: its stored image is missing from {feedback_dir} (run `dvc pull` first?)")
    target = _place(Path(feedback_dir), sha, label, None, None)
    first = rows.iloc[0]
    row_id = store.add_correction(sha, label, old_label=str(first["old_label"]), who=who,
                                  model_version=str(first["model_version"]), stored_path=target.as_posix())  # fmt: skip
    store.set_correction_status(sha, "ok")
    labels = tuple(dict.fromkeys([*(str(x) for x in rows["new_label"]), label]))
    return Correction(sha, label, "resolved", target, row_id, labels)


def find_corrected(store: PredictionLog, key: str) -> list[str]:
    """sha256 values of corrected images starting with ``key`` (a prefix), without repeats."""
    prefix = key.strip().lower()
    rows = store.corrections()
    if not len(rows) or not prefix:
        return []
    return list(dict.fromkeys(s for s in rows["sha256"] if str(s).startswith(prefix)))


@dataclass
class ImageFeedback:
    """One corrected image, for ``emassist feedback list``."""

    sha256: str
    status: str  # ok | conflicting
    label: str  # its current label ("" while conflicting)
    labels: list[str]  # every label its corrections gave, oldest first
    who: list[str]
    last: Any  # time of the newest correction
    n_rows: int
    path: str  # its stored file ("" when missing here)


def summarize(store: PredictionLog, feedback_dir: str | Path) -> list[ImageFeedback]:
    """Every corrected image, conflicting ones first, then newest first."""
    rows = store.corrections()
    out: list[ImageFeedback] = []
    if not len(rows):
        return out
    for sha, group in rows.groupby("sha256", sort=False):
        status = "conflicting" if (group["status"] == "conflicting").any() else "ok"
        files = stored_files(Path(feedback_dir), str(sha))
        out.append(ImageFeedback(
            sha256=str(sha), status=status, label="" if status == "conflicting" else str(group["new_label"].iloc[-1]),
            labels=list(dict.fromkeys(str(x) for x in group["new_label"])),
            who=list(dict.fromkeys(str(x) for x in group["who"] if str(x))), last=group["ts"].iloc[-1],
            n_rows=len(group), path=files[0].as_posix() if files else "",
        ))  # fmt: skip
    out.sort(key=lambda f: f.last, reverse=True)
    out.sort(key=lambda f: f.status != "conflicting")
    return out


# ------------------------------------------------------------------------------------------- acquire


@dataclass
class MergeReport:
    """What :func:`merge_feedback` put into the raw data."""

    per_class: dict[str, int] = field(default_factory=dict)  # merged images per class
    relabelled: list[str] = field(default_factory=list)  # source files (raw-relative) a correction replaced
    conflicting: int = 0  # images left out until resolved
    skipped: list[str] = field(default_factory=list)  # folders/files that are not feedback of a known class

    @property
    def n_merged(self) -> int:
        return sum(self.per_class.values())

    def summary(self) -> str:
        if not self.n_merged and not self.conflicting and not self.skipped:
            return "feedback: no corrected images"
        parts = [f"feedback: {self.n_merged} corrected images merged {self.per_class}"]
        if self.relabelled:
            parts.append(f"{len(self.relabelled)} source files relabelled by a correction (left out, see "
                         f"{UPSTREAM_REJECTED_FILE})")  # fmt: skip
        if self.conflicting:
            parts.append(f"{self.conflicting} conflicting images left out until resolved (emassist feedback list)")
        if self.skipped:
            parts.append(f"skipped: {', '.join(self.skipped[:5])}" + (" …" if len(self.skipped) > 5 else ""))
        return "; ".join(parts)


def merge_feedback(feedback_dir: str | Path, raw_dir: str | Path, classes: Sequence[str]) -> MergeReport:
    """Copy ``feedback_dir/<Class>/<sha256>.<ext>`` to ``raw_dir/<Class>/feedback_<sha256>.<ext>`` for every class
    in ``classes``, after the source's images are in place; a missing ``feedback_dir`` merges nothing.

    A corrected image whose exact bytes are also a source file under another class replaces it: the correction is
    the truth, so the source file is removed and listed in ``raw_dir/_rejected_upstream.csv`` (ingest reports it in
    rejected.csv) rather than left to make the split drop both as conflicting. Near duplicates need nothing here:
    the split's grouping keeps a corrected image in the same split as its near duplicates.
    """
    root, raw = Path(feedback_dir), Path(raw_dir)
    report = MergeReport()
    if not root.is_dir():
        return report
    known = set(classes)
    merged: dict[str, tuple[str, int]] = {}  # sha256 -> (class, size)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name == CONFLICT_DIR:
            report.conflicting = sum(1 for p in folder.iterdir() if p.is_file() and _STORED_RE.match(p.name))
            continue
        if folder.name not in known:
            report.skipped.append(f"{folder.name}/ (not in data.classes)")
            continue
        count = 0
        for src in sorted(folder.iterdir()):
            match = _STORED_RE.match(src.name)
            if not src.is_file() or src.name.startswith("."):
                continue
            if not match:
                report.skipped.append(f"{folder.name}/{src.name} (not named <sha256>.<ext>)")
                continue
            target = raw / folder.name / f"{MERGED_PREFIX}{src.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            merged[match.group(1)] = (folder.name, src.stat().st_size)
            count += 1
        if count:
            report.per_class[folder.name] = count
    if merged:
        report.relabelled = _drop_relabelled_sources(raw, merged)
    return report


def _drop_relabelled_sources(raw: Path, merged: dict[str, tuple[str, int]]) -> list[str]:
    """Remove source files whose bytes equal a merged correction of another class (only files of a matching size
    are hashed); list them in the upstream quarantine file."""
    sizes = {size for _, size in merged.values()}
    dropped: list[dict[str, str]] = []
    for path in sorted(raw.rglob("*")):
        if path.name.startswith(MERGED_PREFIX) or not path.is_file() or path.stat().st_size not in sizes:
            continue
        rel = path.relative_to(raw)
        if len(rel.parts) < 2:
            continue
        sha = sha256_of(path.read_bytes())
        hit = merged.get(sha)
        if hit is None or hit[0] == rel.parts[0]:
            continue  # not corrected, or corrected to the label it already has (ingest and split keep one copy)
        path.unlink()
        reason = f"relabelled by a correction: {hit[0]}/{MERGED_PREFIX}{sha[:12]}…"
        dropped.append({"source_path": rel.as_posix(), "label": rel.parts[0], "reason": reason})
    if dropped:
        quarantine = raw / UPSTREAM_REJECTED_FILE
        new = not quarantine.exists()
        with open(quarantine, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(REJECTED_COLUMNS))
            if new:
                writer.writeheader()
            writer.writerows(dropped)
    return [row["source_path"] for row in dropped]
