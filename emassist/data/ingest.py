"""Ingest: every file under ``raw_dir/<Class>/**`` ends up in exactly one of ``manifest.parquet`` or ``rejected.csv``.

Accepted images go through :class:`emassist.data.preprocess.Preprocessor` (the object serving uses): decoded, data
bar cropped, and an 8-bit grayscale ``cache_size``² PNG cached as ``images/<sha256>.png``. Anything that cannot be
used is quarantined in ``rejected.csv`` with a reason, featureless frames included (a blank or navigation-camera
frame, flatter than ``min_contrast`` after the data-bar crop: "featureless image: ..."). The whole output folder
is built beside the target and swapped in atomically, so an interrupted run leaves the previous output intact.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import multiprocessing.context
import os
import re
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from emassist.core.atomic import atomic_path
from emassist.data.databar import find_databar
from emassist.data.decode import ImageRejected
from emassist.data.hashing import dhash, sha256_of
from emassist.data.pixelsize import resolve_pixel_size
from emassist.data.preprocess import DEFAULT_MIN_CONTRAST, Preprocessor
from emassist.data.scalebar import engine_available
from emassist.data.sem_metadata import METADATA_KEYS

if TYPE_CHECKING:
    import pandas as pd  # imported lazily: workers never need it, and it costs ~1.5 s to import

log = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "sha256", "source_path", "label", "image_path", "width", "height", "mode", "bit_depth",
    "file_size", "format", "n_frames", "databar_rows", "notes", "dhash", "instrument",
    "pixel_size_nm", "magnification", "hv_kv", "wd_mm",
    "pixel_size_source", "pixel_size_reason", "databar_text", "databar_pixel_size_nm",
)  # fmt: skip
REJECTED_COLUMNS: tuple[str, ...] = ("source_path", "label", "reason")
MANIFEST_FILE = "manifest.parquet"
REJECTED_FILE = "rejected.csv"
IMAGES_DIR = "images"
#: Refused upstream (e.g. S3 keys that would escape the data root), written by the acquirer at the top of raw_dir
#: with the columns of rejected.csv; ingest moves its rows into rejected.csv so every object lands somewhere.
UPSTREAM_REJECTED_FILE = "_rejected_upstream.csv"

_INT_COLUMNS = ("width", "height", "bit_depth", "file_size", "n_frames", "databar_rows")
_FLOAT_COLUMNS = ("pixel_size_nm", "magnification", "hv_kv", "wd_mm", "databar_pixel_size_nm")
_PNG_COMPRESS_LEVEL = 1  # cached PNGs: ~5x faster to write than the default 6 for ~15% more bytes


class _Progress(tqdm):  # type: ignore[type-arg]
    """tqdm without its monitor thread: worker processes may then be forked safely (see _mp_context)."""

    monitor_interval = 0


@dataclass(frozen=True)
class _Settings:
    images_dir: str
    preprocessor: Preprocessor
    bar_not_read: str | None = None  # why data bars are not read (OCR off or no engine); None: they are


@dataclass(frozen=True)
class _Task:
    path: str  # absolute path to read
    source_path: str  # posix, relative to raw_dir
    label: str


@dataclass
class IngestSummary:
    n_files: int
    n_accepted: int
    n_rejected: int
    per_class: dict[str, int]  # accepted images per known class, in class order
    seconds: float
    rejected_per_class: dict[str, int] = field(default_factory=dict)  # by folder name ("" = top level)
    n_unique: int = 0  # distinct images (sha256) cached
    reasons: dict[str, int] = field(default_factory=dict)  # rejection kinds, most common first
    out_dir: str = ""
    pixel_sizes: dict[str, int] = field(default_factory=dict)  # accepted images per pixel_size_source
    notices: list[str] = field(default_factory=list)  # said once per run (e.g. no OCR engine)

    @property
    def files_per_second(self) -> float:
        return self.n_files / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"ingest: {self.n_files} files -> {self.n_accepted} accepted ({self.n_unique} unique images), "
            f"{self.n_rejected} rejected in {self.seconds:.1f} s ({self.files_per_second:.0f} files/s)"
            + (f" -> {self.out_dir}" if self.out_dir else ""),
            f"  {'class':<30} {'accepted':>9} {'rejected':>9}",
        ]
        for name, count in self.per_class.items():
            lines.append(f"  {name:<30} {count:>9} {self.rejected_per_class.get(name, 0):>9}")
        others = sum(v for k, v in self.rejected_per_class.items() if k not in self.per_class)
        if others:
            lines.append(f"  {'(other folders)':<30} {'-':>9} {others:>9}")
        lines.append(f"  {'total':<30} {self.n_accepted:>9} {self.n_rejected:>9}")
        if self.reasons:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.reasons.items())
            lines.append(f"  rejected: {kinds}")
        if self.pixel_sizes:
            lines.append("  pixel size: " + ", ".join(f"{n} {src}" for src, n in self.pixel_sizes.items()))
        lines += [f"  note: {notice}" for notice in self.notices]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- scanning


def _rel_posix(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _reason_kind(reason: str) -> str:
    """'truncated JPEG: image file is truncated' → 'truncated JPEG'; "unknown class folder 'X' (...)" → 'unknown...'."""
    return re.split(r":| '| \(", reason, maxsplit=1)[0].strip() or reason


def _is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable_path(text: str) -> str:
    """File names that are not valid UTF-8 arrive with surrogate escapes; make them storable."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _scan(raw_dir: Path) -> Iterator[Path]:
    """Every non-directory entry under raw_dir (files, symlinks, fifos, ...), plus symlinked and unreadable
    folders as single entries. Sorted, never following links."""
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(raw_dir, followlinks=False, onerror=errors.append):
        here = Path(dirpath)
        dirnames.sort()
        for name in list(dirnames):
            if (here / name).is_symlink():
                dirnames.remove(name)
                yield here / name
        for name in sorted(filenames):
            yield here / name
    for err in errors:
        if err.filename and Path(err.filename) != raw_dir:
            yield Path(err.filename)
    if errors and any(Path(e.filename or "") == raw_dir for e in errors):
        raise PermissionError(f"cannot list {raw_dir}")


def _classify(
    path: Path, raw_dir: Path, raw_real: Path, classes: frozenset[str], known: str
) -> tuple[_Task | None, dict[str, str] | None]:
    """Cheap checks that need no file content: a task to decode, or a rejection row."""
    rel = _rel_posix(path, raw_dir)
    parts = rel.split("/")
    label = parts[0] if len(parts) > 1 or path.is_dir() else ""
    shown = _printable_path(rel)

    def reject(reason: str) -> tuple[None, dict[str, str]]:
        return None, {"source_path": shown, "label": _printable_path(label), "reason": reason}

    if not _is_valid_utf8(rel):
        return reject("file name is not valid UTF-8")
    try:
        st = path.lstat()
    except OSError as exc:
        return reject(f"unreadable: {exc.strerror or exc}")
    if stat.S_ISDIR(st.st_mode):
        # Only unreadable folders reach here (os.walk could not list them).
        return reject("unreadable folder: permission denied")
    if len(parts) == 1:
        return reject("not inside a class folder")
    if label not in classes:
        return reject(f"unknown class folder '{label}' (known: {known})")
    hidden = next((p for p in parts[1:] if p.startswith(".")), None)
    if hidden is not None:
        return reject(f"hidden file or folder '{hidden}'")
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(raw_real):
            return reject("symlink pointing outside raw_dir")
        if not target.exists():
            return reject("broken symlink")
        if target.is_dir():
            return reject("symlink to a folder (not followed)")
        try:
            st = target.stat()
        except OSError as exc:
            return reject(f"unreadable: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        return reject(f"not a regular file ({kind})")
    return _Task(path=str(path), source_path=rel, label=label), None


# --------------------------------------------------------------------------------------------------- per file


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _write_png(gray: np.ndarray, target: Path) -> None:
    if target.exists():  # exact duplicate already cached (same sha256, same bytes)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    Image.fromarray(gray).save(tmp, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    os.replace(tmp, target)


def _ingest_one(task: _Task, settings: _Settings) -> tuple[str, dict[str, Any]]:
    """('ok', manifest row) or ('rejected', rejected row). Never raises for a bad file."""

    def reject(reason: str) -> tuple[str, dict[str, Any]]:
        return "rejected", {"source_path": task.source_path, "label": task.label, "reason": reason}

    try:
        try:
            data = _read_file(task.path)
        except PermissionError:
            return reject("unreadable: permission denied")
        except OSError as exc:
            return reject(f"unreadable: {exc.strerror or exc}")
        if not data:
            return reject("zero-byte file")
        sha = sha256_of(data)
        decoded = settings.preprocessor.decode(data)
        cached, rows = settings.preprocessor.standardize(decoded.gray)
        # The pixel size: tags, else the cropped-off data bar of this same decode (never decoded twice).
        bar_rows = rows if settings.preprocessor.crop_databar else find_databar(decoded.gray)
        bar = decoded.gray[decoded.height - bar_rows :] if bar_rows else None
        size = resolve_pixel_size(
            decoded.metadata.get("pixel_size_nm"), bar, decoded.width, bar_not_read=settings.bar_not_read
        )
        image_path = f"{IMAGES_DIR}/{sha}.png"
        _write_png(cached, Path(settings.images_dir) / f"{sha}.png")
        row: dict[str, Any] = {
            "sha256": sha,
            "source_path": task.source_path,
            "label": task.label,
            "image_path": image_path,
            "width": decoded.width,
            "height": decoded.height,
            "mode": decoded.mode,
            "bit_depth": decoded.bit_depth,
            "file_size": len(data),
            "format": decoded.format,
            "n_frames": decoded.n_frames,
            "databar_rows": rows,
            "notes": decoded.notes,
            "dhash": dhash(cached),
        }
        for key in METADATA_KEYS:
            row[key] = decoded.metadata.get(key)
        row.update(
            pixel_size_nm=size.nm,
            pixel_size_source=size.source,
            pixel_size_reason=size.reason,
            databar_text=size.databar_text,
            databar_pixel_size_nm=size.databar_nm,
        )
        return "ok", row
    except ImageRejected as exc:
        return reject(exc.reason)
    except MemoryError:
        return reject("unexpected error: out of memory")
    except Exception as exc:
        return reject(f"unexpected error: {type(exc).__name__}: {exc}")


def _ingest_chunk(tasks: Sequence[_Task], settings: _Settings) -> list[tuple[str, dict[str, Any]]]:
    return [_ingest_one(task, settings) for task in tasks]


# --------------------------------------------------------------------------------------------------- execution


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """How worker processes start.

    A plain fork is by far the cheapest (~10 ms against ~1.2 s for a fork server that must import numpy,
    pandas and Pillow), but forking a process that runs other threads can deadlock. So: fork on Linux while this
    process is single-threaded (pools are started before the progress bar's monitor thread), otherwise a fork
    server that has already imported this module.
    """
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context()


def _start_pool(workers: int) -> cf.ProcessPoolExecutor:
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
    pool.submit(int).result()  # start the workers now, before any thread (tqdm's monitor) exists
    return pool


def _chunks(items: Sequence[_Task], size: int) -> list[list[_Task]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _run_parallel(
    tasks: Sequence[_Task], settings: _Settings, pool: cf.ProcessPoolExecutor, workers: int, bar: tqdm
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Process tasks on a process pool. If a worker process dies (a native crash in a decoder), the affected
    files are retried one at a time in a fresh single-worker pool so the culprit alone is quarantined."""
    chunk = max(1, min(32, len(tasks) // (workers * 8) or 1))
    pending = _chunks(tasks, chunk)
    retry: list[_Task] = []
    with pool:
        futures: dict[cf.Future[list[tuple[str, dict[str, Any]]]], list[_Task]] = {}
        for i, c in enumerate(pending):
            try:
                futures[pool.submit(_ingest_chunk, c, settings)] = c
            except BrokenProcessPool:
                retry.extend(t for rest in pending[i:] for t in rest)
                break
        try:
            for future in cf.as_completed(futures):
                try:
                    results = future.result()
                except BrokenProcessPool:
                    retry.extend(futures[future])
                    continue
                bar.update(len(results))
                yield from results
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    if retry:
        log.warning("a worker process died; retrying %d files one at a time", len(retry))
        yield from _run_isolated(sorted(retry, key=lambda t: t.source_path), settings, bar)


def _run_isolated(tasks: Sequence[_Task], settings: _Settings, bar: tqdm) -> Iterator[tuple[str, dict[str, Any]]]:
    pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=_mp_context())
    try:
        for task in tasks:
            try:
                (result,) = pool.submit(_ingest_chunk, [task], settings).result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=_mp_context())
                result = (
                    "rejected",
                    {"source_path": task.source_path, "label": task.label,
                     "reason": "unexpected error: decoder crashed (worker process died)"},
                )  # fmt: skip
            bar.update(1)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_serial(tasks: Iterable[_Task], settings: _Settings, bar: tqdm) -> Iterator[tuple[str, dict[str, Any]]]:
    for task in tasks:
        result = _ingest_one(task, settings)
        bar.update(1)
        yield result


# --------------------------------------------------------------------------------------------------- outputs


def _manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    for col in _INT_COLUMNS:
        frame[col] = frame[col].astype("int64")
    for col in _FLOAT_COLUMNS:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    for col in MANIFEST_COLUMNS:
        if col not in _INT_COLUMNS and col not in _FLOAT_COLUMNS:
            frame[col] = frame[col].astype("str") if col != "instrument" else frame[col].astype("object")
    frame["instrument"] = frame["instrument"].where(frame["instrument"].notna(), None)
    return frame.sort_values("source_path", kind="stable").reset_index(drop=True)


def _rejected_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(REJECTED_COLUMNS)).astype("str")
    return frame.sort_values("source_path", kind="stable").reset_index(drop=True)


def _write_outputs(out: Path, manifest: pd.DataFrame, rejected: pd.DataFrame) -> None:
    manifest.to_parquet(out / MANIFEST_FILE, index=False)
    rejected.to_csv(out / REJECTED_FILE, index=False)


def read_upstream_rejected(path: Path) -> list[dict[str, str]]:
    """Rows of an acquirer's quarantine list (``UPSTREAM_REJECTED_FILE``), in rejected.csv's columns."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return [{c: str(row.get(c) or "") for c in REJECTED_COLUMNS} for row in csv.DictReader(fh)]


def run_ingest(
    raw_dir: Path,
    out_dir: Path,
    *,
    classes: Sequence[str],
    cache_size: int,
    max_pixels: int,
    min_side: int,
    crop_databar: bool,
    min_contrast: float = DEFAULT_MIN_CONTRAST,
    workers: int = 0,
    progress: bool = True,
    read_databar: bool = False,
) -> IngestSummary:
    """Decode, crop, cache and catalogue every file under ``raw_dir/<Class>/**`` into ``out_dir``.

    Writes ``out_dir/manifest.parquet`` (one row per accepted file, sorted by ``source_path``),
    ``out_dir/rejected.csv`` (``source_path,label,reason``) and ``out_dir/images/<sha256>.png``. Every file found
    lands in exactly one of the two tables. ``workers=0`` uses all cores, ``workers=1`` runs in this process.
    ``min_contrast``: images whose gray levels vary less (std, after the data-bar crop) are rejected as featureless;
    0 accepts them. ``read_databar``: read the pixel size off data bars (OCR) where the tags lack it; without an
    OCR engine the run goes on and says so once (``IngestSummary.notices``).
    """
    started = time.perf_counter()
    raw_dir = Path(raw_dir)
    out_dir = Path(out_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir} is not a folder")
    if cache_size < 1 or max_pixels < 1 or min_side < 1:
        raise ValueError("cache_size, max_pixels and min_side must be positive")
    preprocessor = Preprocessor(cache_size, crop_databar, max_pixels, min_side, min_contrast=min_contrast)
    raw_real = raw_dir.resolve()
    if out_dir.resolve().is_relative_to(raw_real):
        raise ValueError(f"out_dir {out_dir} must not be inside raw_dir {raw_dir}")
    class_set = frozenset(classes)
    known = ", ".join(classes)

    tasks: list[_Task] = []
    rejected_rows: list[dict[str, Any]] = []
    for path in _scan(raw_dir):
        if path.parent == raw_dir and path.name == UPSTREAM_REJECTED_FILE and path.is_file():
            rejected_rows.extend(read_upstream_rejected(path))
            continue
        task, rejection = _classify(path, raw_dir, raw_real, class_set, known)
        if task is not None:
            tasks.append(task)
        elif rejection is not None:
            rejected_rows.append(rejection)
    n_files = len(tasks) + len(rejected_rows)
    n_workers = min(workers or _cpu_count(), max(1, len(tasks)))

    notices: list[str] = []
    bar_not_read = None if read_databar else "ingest.read_databar is false"
    if read_databar and tasks:
        problem = engine_available()  # once per run, not per image
        if problem is not None:
            bar_not_read = problem
            notices.append(f"data-bar text is not read ({problem}): pixel sizes come from tags only")
            log.warning("ingest: %s", notices[-1])

    manifest_rows: list[dict[str, Any]] = []
    with atomic_path(out_dir) as tmp:
        images_dir = tmp / IMAGES_DIR
        images_dir.mkdir(parents=True)
        settings = _Settings(str(images_dir), preprocessor, bar_not_read)
        parallel = n_workers > 1 and len(tasks) >= 4
        pool = _start_pool(n_workers) if parallel else None
        try:
            with _Progress(total=n_files, disable=not progress, unit="img", desc="ingest", dynamic_ncols=True) as bar:
                bar.update(len(rejected_rows))
                if pool is not None:
                    results = _run_parallel(tasks, settings, pool, n_workers, bar)
                else:
                    results = _run_serial(tasks, settings, bar)
                for status, row in results:
                    (manifest_rows if status == "ok" else rejected_rows).append(row)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        # Never leave a half-written PNG behind (they are written under temporary names first).
        for leftover in images_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        manifest = _manifest_frame(manifest_rows)
        rejected = _rejected_frame(rejected_rows)
        _write_outputs(tmp, manifest, rejected)

    counts = Counter(manifest["label"])
    rejected_counts = Counter(rejected["label"])
    summary = IngestSummary(
        n_files=n_files,
        n_accepted=len(manifest),
        n_rejected=len(rejected),
        per_class={c: int(counts.get(c, 0)) for c in classes},
        seconds=time.perf_counter() - started,
        rejected_per_class=dict(sorted(rejected_counts.items())),
        n_unique=int(manifest["sha256"].nunique()),
        reasons=dict(Counter(_reason_kind(r) for r in rejected["reason"]).most_common()),
        out_dir=str(out_dir),
        pixel_sizes=dict(Counter(manifest["pixel_size_source"]).most_common()),
        notices=notices,
    )
    log.info("ingest finished: %d accepted, %d rejected", summary.n_accepted, summary.n_rejected)
    return summary
