"""What the watcher writes: results.jsonl / results.csv, the ``--sort`` copies, and ``--alert`` messages.

Results are appended one batch at a time and fsynced BEFORE the state file commits the batch (see
:mod:`emassist.pipeline.watch_state`): a watcher killed in between finds the batch's rows after the recorded
offsets on its next start (:meth:`Results.recover`), records them and does not classify those files again; a line
cut short by the kill is removed and its file answered again. Nothing in the watched folder is ever modified,
moved or deleted: ``--sort`` copies (atomically: a temporary name, then a rename).
"""

from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import requests

from emassist.pipeline.watch_state import Done, WatchState

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
REJECTED_DIR = "_rejected"  # --sort: files that are no image (or unusable) are copied here
BASE_COLUMNS = ("time", "path", "status", "label", "confidence", "needs_review", "review_reason", "unfamiliar",
                "unfamiliar_score", "error", "sha256", "model", "model_version", "sorted_to")  # fmt: skip


#: The last columns of a scale-aware model's results: the pixel size its answer used (the file's, the model
#: input's) and where it came from (tags | databar_scalebar | databar_mag | unknown); empty for a file not answered.
SCALE_COLUMNS = ("pixel_size_nm", "model_pixel_size_nm", "pixel_size_source")


def csv_columns(classes: Sequence[str], *, scale: bool = False) -> list[str]:
    return [*BASE_COLUMNS, *classes, *(SCALE_COLUMNS if scale else ())]


class Results:
    """results.jsonl (one JSON object a line: the record, probabilities as an object) and results.csv (the same,
    one column per class; a scale-aware model's (``scale``) also :data:`SCALE_COLUMNS`) in the output folder."""

    def __init__(self, out: Path, classes: Sequence[str], *, scale: bool = False) -> None:
        self.out = out
        self.classes = list(classes)
        self.scale = scale
        self.jsonl_path = out / RESULTS_JSONL
        self.csv_path = out / RESULTS_CSV
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl: Any = None
        self._csv: Any = None

    # ------------------------------------------------------------------------------------------------ start

    def recover(self, state: WatchState) -> int:
        """Make the results files and the state agree after a hard stop; returns the rows recovered into the state.

        Rows after the state's recorded JSONL offset were written but not committed: they are recorded now. A cut
        last line is dropped; the CSV is cut back to its recorded offset (to its header when nothing was committed
        yet) and those rows are written to it again."""
        jsonl_done = state.offset("jsonl_offset") or 0
        csv_done = state.offset("csv_offset")
        recovered: list[dict[str, Any]] = []
        if self.jsonl_path.exists():
            with open(self.jsonl_path, "rb+") as fh:
                size = fh.seek(0, os.SEEK_END)
                jsonl_done = min(jsonl_done, size)
                fh.seek(jsonl_done)
                tail = fh.read()
                keep = tail.rfind(b"\n") + 1  # a last line without its newline was cut by the stop
                for line in tail[:keep].splitlines():
                    try:
                        recovered.append(json.loads(line))
                    except ValueError:
                        continue
                if keep < len(tail):
                    fh.truncate(jsonl_done + keep)
        self._open_csv(csv_done)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open while watching
        if recovered:
            self._write_csv(recovered)
            self._sync()
            state.record([_done(r) for r in recovered], self.offsets())
        return len(recovered)

    def _open_csv(self, done: int | None) -> None:
        header = csv_columns(self.classes, scale=self.scale)
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with open(self.csv_path, encoding="utf-8", newline="") as fh:
                first = next(csv.reader([fh.readline()]), [])
            if first != header:  # another model's classes (or scale input): keep the old file, start a new one
                self.csv_path.rename(self.csv_path.with_name(f"results-{time.strftime('%Y%m%d-%H%M%S')}.csv"))
                done = None
            else:  # cut back to the last commit (none yet: to the header); the recovered rows are written again
                with open(self.csv_path, "rb+") as fh:
                    end = fh.seek(0, os.SEEK_END)
                    fh.seek(0)
                    header_end = len(fh.readline())
                    fh.truncate(min(max(done, header_end), end) if done is not None else header_end)
        fresh = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - kept open while watching
        if fresh:
            csv.writer(self._csv, lineterminator="\n").writerow(header)
            self._csv.flush()

    # ------------------------------------------------------------------------------------------------ writing

    def append(self, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Append a batch to both files and fsync them; returns the offsets after it (for the state)."""
        for r in records:
            self._jsonl.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._write_csv(records)
        self._sync()
        return self.offsets()

    def _write_csv(self, records: Sequence[Mapping[str, Any]]) -> None:
        writer = csv.writer(self._csv, lineterminator="\n")
        for r in records:
            probs = r.get("probabilities") or {}
            row = ["" if r.get(c) is None else r.get(c) for c in BASE_COLUMNS]
            tail = ["" if r.get(c) is None else r.get(c) for c in SCALE_COLUMNS] if self.scale else []
            writer.writerow(row + [probs.get(c, "") for c in self.classes] + tail)

    def _sync(self) -> None:
        for fh in (self._jsonl, self._csv):
            fh.flush()
            os.fsync(fh.fileno())

    def offsets(self) -> dict[str, int]:
        return {"jsonl_offset": self._jsonl.tell(), "csv_offset": self._csv.tell()}

    def close(self) -> None:
        for fh in (self._jsonl, self._csv):
            if fh is not None:
                fh.close()


def _done(record: Mapping[str, Any]) -> Done:
    return Done(str(record["relpath"]), str(record.get("sha256") or ""), str(record.get("sig") or ""),
                str(record["status"]), str(record.get("label") or ""), time.time())  # fmt: skip


def done_of(record: Mapping[str, Any]) -> Done:
    """The state row of a result record."""
    return _done(record)


# ------------------------------------------------------------------------------------------------ --sort


def sort_copy(source: Path, out: Path, folder: str, relpath: str) -> Path:
    """Copy ``source`` to ``out/<folder>/<relpath>`` (subfolders kept: two ``img1.tif`` never collide); the copy
    appears whole or not at all. The source is only read."""
    target = out / folder / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target


# ------------------------------------------------------------------------------------------------ --alert


class Alerter:
    """The needle: a target class at or above the confidence. A highlighted line and the terminal bell on
    ``stream``; with ``url``, a JSON POST from a background thread (a slow or dead receiver never holds the
    watcher; a failure is one warning line)."""

    def __init__(
        self,
        classes: Sequence[str],
        min_confidence: float,
        *,
        url: str | None = None,
        timeout_s: float = 5.0,
        stream: TextIO | None = None,
        color: bool | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.classes = set(classes)
        self.min_confidence = float(min_confidence)
        self.url = url
        self.timeout_s = timeout_s
        self.stream = stream if stream is not None else sys.stdout
        self.color = self.stream.isatty() if color is None else color
        self.on_error = on_error or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=1000)
        self._thread: threading.Thread | None = None
        if url:
            self._thread = threading.Thread(target=self._post_loop, name="watch-alert", daemon=True)
            self._thread.start()

    def fires(self, record: Mapping[str, Any]) -> bool:
        return (record.get("status") == "classified" and record.get("label") in self.classes
                and float(record.get("confidence") or 0.0) >= self.min_confidence)  # fmt: skip

    def line(self, record: Mapping[str, Any]) -> str:
        review = "  [check by eye]" if record.get("needs_review") else ""
        text = f"ALERT {record['label']} {float(record['confidence']):.3f}: {record['path']}{review}"
        return f"\a\x1b[1;33;41m{text}\x1b[0m" if self.color else f"\a{text}"

    def __call__(self, record: Mapping[str, Any], write: Callable[[str], None] | None = None) -> bool:
        """Alert for ``record`` when it fires; returns whether it did."""
        if not self.fires(record):
            return False
        (write or self._print)(self.line(record))
        if self.url:
            message = {"event": "alert", **{k: record.get(k) for k in (
                "time", "path", "relpath", "label", "confidence", "needs_review", "review_reason", "unfamiliar",
                "sha256", "model", "model_version")}}  # fmt: skip
            try:
                self._queue.put_nowait(message)
            except queue.Full:
                self.failed += 1
        return True

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _post_loop(self) -> None:
        session = requests.Session()
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                response = session.post(str(self.url), json=message, timeout=self.timeout_s)
                response.raise_for_status()
                self.sent += 1
            except requests.RequestException as exc:
                self.failed += 1
                self.on_error(f"alert POST to {self.url} failed: {type(exc).__name__}: {str(exc)[:200]}")

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued (each POST bounded by its timeout), then stop the sender."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout if timeout is not None else self.timeout_s * 2)
