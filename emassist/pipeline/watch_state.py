"""The watcher's memory across restarts: which files (relative path + sha256) it has already answered.

A small SQLite file (``watch.state_file``, beside the results). Each row: the file's path relative to the watched
folder, the sha256 of its bytes, the stat signature it had (size and mtime, so that a restart skips an unchanged
file without reading it), what became of it (classified / rejected / incomplete / unreadable) and the label. A file
whose bytes change is a new (path, sha256) and is answered again; the same bytes touched again are not.

``meta`` keeps the byte offsets of results.jsonl and results.csv after the last committed batch: the results file
is written (and fsynced) before the state commits, so a watcher killed between the two finds the rows after those
offsets on its next start and records them instead of classifying the files twice (see
:mod:`emassist.pipeline.watch_outputs`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    sig TEXT NOT NULL,
    status TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL,
    PRIMARY KEY (path, sha256)
);
CREATE INDEX IF NOT EXISTS files_by_path ON files (path);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: Outcomes a restart never repeats for the same stat signature.
FINAL_STATUSES = frozenset({"classified", "rejected", "incomplete", "unreadable"})


def stat_sig(st: os.stat_result, *, with_ctime: bool = False) -> str:
    """The signature a restart compares: size and mtime (ns); ``with_ctime`` adds the change time, which a chmod
    moves (an unreadable file is retried once its permissions change)."""
    sig = f"{st.st_size}:{st.st_mtime_ns}"
    return f"{sig}:{st.st_ctime_ns}" if with_ctime else sig


@dataclass(frozen=True)
class Done:
    """One answered file, as the state keeps it."""

    path: str  # relative to the watched folder, POSIX
    sha256: str  # "" where the file could not be read
    sig: str
    status: str
    label: str = ""
    at: float = 0.0


class WatchState:
    """The state file; safe to share between the watcher's threads (one connection behind a lock)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed transaction
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def seen_unchanged(self, path: str, st: os.stat_result) -> bool:
        """Whether ``path`` was answered with exactly this stat signature (no need to read it again)."""
        with self._lock:
            rows = self._db.execute("SELECT sig, status FROM files WHERE path = ?", (path,)).fetchall()
        for sig, status in rows:
            if status in FINAL_STATUSES and sig == stat_sig(st, with_ctime=status == "unreadable"):
                return True
        return False

    def has(self, path: str, sha256: str) -> bool:
        """Whether these bytes at this path were already answered (classified or rejected)."""
        with self._lock:
            row = self._db.execute("SELECT status FROM files WHERE path = ? AND sha256 = ?", (path, sha256)).fetchone()
        return row is not None and row[0] in ("classified", "rejected")

    def touch(self, path: str, sha256: str, sig: str) -> None:
        """The same bytes seen with a new stat signature (touched, copied with a new mtime): remember it."""
        with self._lock:
            self._db.execute("UPDATE files SET sig = ? WHERE path = ? AND sha256 = ?", (sig, path, sha256))

    def record(self, done: Iterable[Done], offsets: dict[str, int] | None = None) -> None:
        """Record a batch's outcomes and the results files' offsets after it, in one transaction."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO files (path, sha256, sig, status, label, at) VALUES (?, ?, ?, ?, ?, ?)",
                    [(d.path, d.sha256, d.sig, d.status, d.label, d.at) for d in done],
                )
                for key, value in (offsets or {}).items():
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def offset(self, key: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else None

    def count(self, status: str | None = None) -> int:
        with self._lock:
            if status is None:
                return int(self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM files WHERE status = ?", (status,)).fetchone()[0])
