"""The prediction log: every answer the product gives, and every correction a microscopist makes, in one database.

One SQLAlchemy URL (``monitoring.db_uri``): an SQLite file by default, PostgreSQL for a team. Two tables:

* ``predictions``: time (UTC), source (``web`` | ``cli`` | ``scan`` | ``server`` | ``watch`` | ``batch``), the image's
  sha256 (of the file's bytes, as ingest computes it), where it came from (a path or an upload's name), size and format,
  SEM metadata when known, image statistics of the standardized image (brightness, contrast), the model (name, version,
  alias), the answer (label, calibrated confidence, every class's probability as JSON, needs_review, unfamiliar and its
  score).
* ``corrections``: time, sha256, the model version and label it corrects, the right label, who (free text), where
  the image was stored, and a status (``ok`` | ``conflicting``).

:class:`PredictionLog` is the store (tables created on first use; every write one transaction, so a crash loses no
committed row and never leaves half a batch). :class:`LogWriter` batches rows on a background thread so that a
prediction never waits for the database: :meth:`LogWriter.record` never raises and never blocks; when the store
is unreachable or read-only the rows stay pending (one warning) and are retried, up to ``max_pending``, beyond
which the oldest are dropped and counted (:attr:`LogWriter.stats`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

log = logging.getLogger(__name__)

SOURCES = ("web", "cli", "scan", "server", "watch", "batch")
CORRECTION_STATUSES = ("ok", "conflicting")

#: Creators of the tables in this process take turns (see :meth:`PredictionLog.ensure_tables`).
_CREATE_LOCK = threading.Lock()
#: A CREATE that lost a race to another process is checked again this many times in all.
CREATE_ATTEMPTS = 3

_metadata = sa.MetaData()
PREDICTIONS = sa.Table(
    "predictions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("origin", sa.Text, nullable=False, default=""),  # the path read, or the upload's file name
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("format", sa.String(16)),
    sa.Column("pixel_size_nm", sa.Float),
    sa.Column("magnification", sa.Float),
    sa.Column("instrument", sa.String(64)),
    sa.Column("brightness", sa.Float),  # mean gray level (0..255) of the standardized image
    sa.Column("contrast", sa.Float),  # its standard deviation
    sa.Column("model_name", sa.String(128), nullable=False, default=""),
    sa.Column("model_version", sa.String(32), nullable=False, default=""),
    sa.Column("model_alias", sa.String(64), nullable=False, default=""),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON {class: p}
    sa.Column("needs_review", sa.Boolean, nullable=False),
    sa.Column("unfamiliar", sa.Boolean),  # null: the model ships no familiarity check
    sa.Column("unfamiliar_score", sa.Float),
)
CORRECTIONS = sa.Table(
    "corrections",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("old_label", sa.String(64), nullable=False, default=""),
    sa.Column("new_label", sa.String(64), nullable=False),
    sa.Column("who", sa.String(128), nullable=False, default=""),
    sa.Column("model_version", sa.String(32), nullable=False, default=""),
    sa.Column("stored_path", sa.Text, nullable=False, default=""),
    sa.Column("status", sa.String(16), nullable=False, default="ok"),
)


class PredictionLogError(RuntimeError):
    """The store cannot be opened or written; the message names the URL (without its password) and why."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class PredictionRow:
    """One answer, as logged. ``probabilities``: ``{class: p}``."""

    source: str
    sha256: str
    label: str
    confidence: float
    probabilities: Mapping[str, float]
    needs_review: bool
    origin: str = ""
    width: int | None = None
    height: int | None = None
    format: str | None = None
    pixel_size_nm: float | None = None
    magnification: float | None = None
    instrument: str | None = None
    brightness: float | None = None
    contrast: float | None = None
    model_name: str = ""
    model_version: str = ""
    model_alias: str = ""
    unfamiliar: bool | None = None
    unfamiliar_score: float | None = None
    ts: datetime = field(default_factory=utcnow)

    def as_record(self) -> dict[str, Any]:
        """The row as the table stores it (probabilities as JSON; NaN as null)."""
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        row = {f.name: getattr(self, f.name) for f in fields(self)}  # asdict would deep-copy (hot path)
        row["probabilities"] = json.dumps({str(k): round(float(v), 6) for k, v in self.probabilities.items()})
        for key, value in row.items():
            if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
                row[key] = None
            elif isinstance(value, np.generic):
                row[key] = value.item()
        return row


def image_stats(gray: np.ndarray) -> tuple[float, float]:
    """(brightness, contrast): mean and standard deviation of a standardized uint8 image's gray levels.

    From the 256-bin histogram (exact for uint8, ~4x faster than float mean/std: it runs on every served request);
    other dtypes are measured directly."""
    g = np.asarray(gray)
    if g.dtype != np.uint8:
        g = g.astype(np.float64)
        return float(g.mean()), float(g.std())
    hist = np.bincount(g.ravel(), minlength=256).astype(np.float64)
    n = float(hist.sum())
    if not n:
        return float("nan"), float("nan")
    mean = float(hist @ _LEVELS) / n
    var = float(hist @ (_LEVELS * _LEVELS)) / n - mean * mean
    return mean, math.sqrt(max(var, 0.0))


_LEVELS = np.arange(256, dtype=np.float64)


def safe_url(db_uri: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sa.engine.make_url(db_uri).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return db_uri


class PredictionLog:
    """The store behind one SQLAlchemy URL; tables are created when missing."""

    def __init__(self, db_uri: str, *, connect_timeout_s: float = 5.0) -> None:
        self.db_uri = db_uri
        connect_args: dict[str, Any] = {}
        if db_uri.startswith("sqlite"):
            connect_args["timeout"] = connect_timeout_s  # wait for another writer's lock instead of failing
        elif db_uri.startswith("postgresql"):
            connect_args["connect_timeout"] = max(1, int(connect_timeout_s))
        try:
            url = sa.engine.make_url(db_uri)
            if url.drivername == "postgresql":  # SQLAlchemy 2.1 would pick psycopg 3; the lock ships psycopg2
                url = url.set(drivername="postgresql+psycopg2")
            self.engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
            if url.drivername.startswith("sqlite"):
                sa.event.listen(self.engine, "connect", _sqlite_wal)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise PredictionLogError(f"monitoring.db_uri {safe_url(db_uri)!r} is not usable: {exc}") from exc
        self._ready = False

    def ensure_tables(self) -> None:
        """Create the tables (and their indexes) that are missing; safe when several creators race on one store.

        ``create_all`` checks for each table, then creates it: two creators (two stores on one file in a process,
        e.g. the page's and its log writer's; or two processes) can both find it missing, and the second CREATE fails
        with "table ... already exists". Creators of one process take turns (:data:`_CREATE_LOCK`); a CREATE that
        loses to another process is followed by a fresh check (``create_all`` again: the table is there now)."""
        if self._ready:
            return
        with _CREATE_LOCK:
            for attempt in range(1, CREATE_ATTEMPTS + 1):
                try:
                    _metadata.create_all(self.engine, checkfirst=True)
                    break
                except sa.exc.SQLAlchemyError as exc:
                    if attempt < CREATE_ATTEMPTS and _already_exists(exc):
                        continue  # another creator got there between the check and the CREATE: check again
                    raise PredictionLogError(
                        f"cannot open the prediction log {safe_url(self.db_uri)}: {_short(exc)}"
                    ) from exc
        self._ready = True

    # ------------------------------------------------------------------------------------------- writes

    def write(self, rows: Sequence[PredictionRow | Mapping[str, Any]]) -> int:
        """Insert ``rows`` in one transaction (all or none); returns how many."""
        if not rows:
            return 0
        self.ensure_tables()
        records = [r.as_record() if isinstance(r, PredictionRow) else dict(r) for r in rows]
        try:
            with self.engine.begin() as conn:
                conn.execute(PREDICTIONS.insert(), records)
        except sa.exc.SQLAlchemyError as exc:
            raise PredictionLogError(
                f"cannot write to the prediction log {safe_url(self.db_uri)}: {_short(exc)}"
            ) from exc
        return len(records)

    def add_correction(
        self,
        sha256: str,
        new_label: str,
        *,
        old_label: str = "",
        who: str = "",
        model_version: str = "",
        stored_path: str = "",
        status: str = "ok",
        ts: datetime | None = None,
    ) -> int:
        """One correction row; returns its id."""
        if status not in CORRECTION_STATUSES:
            raise ValueError(f"status must be one of {CORRECTION_STATUSES}, got {status!r}")
        self.ensure_tables()
        row = {"ts": ts or utcnow(), "sha256": sha256, "old_label": old_label, "new_label": new_label, "who": who,
               "model_version": model_version, "stored_path": stored_path, "status": status}  # fmt: skip
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(CORRECTIONS.insert(), row).inserted_primary_key[0])
        except sa.exc.SQLAlchemyError as exc:
            raise PredictionLogError(
                f"cannot write to the prediction log {safe_url(self.db_uri)}: {_short(exc)}"
            ) from exc

    def set_correction_status(self, sha256: str, status: str) -> int:
        """Set the status of every correction of ``sha256``; returns how many rows changed."""
        if status not in CORRECTION_STATUSES:
            raise ValueError(f"status must be one of {CORRECTION_STATUSES}, got {status!r}")
        self.ensure_tables()
        with self.engine.begin() as conn:
            result = conn.execute(CORRECTIONS.update().where(CORRECTIONS.c.sha256 == sha256).values(status=status))
            return int(result.rowcount or 0)

    # ------------------------------------------------------------------------------------------- reads

    def predictions(self, *, since: datetime | None = None, sha256: str | None = None) -> Any:
        """Logged predictions as a DataFrame (oldest first), optionally only those after ``since`` / of one image."""
        return self._read(PREDICTIONS, since=since, sha256=sha256)

    def corrections(self, *, since: datetime | None = None, sha256: str | None = None) -> Any:
        """Corrections as a DataFrame (oldest first), optionally only those after ``since`` / of one image."""
        return self._read(CORRECTIONS, since=since, sha256=sha256)

    def find_sha256(self, prefix_or_origin: str) -> list[str]:
        """The sha256 values of logged images whose sha256 starts with ``prefix_or_origin`` or whose origin (path or
        upload name) equals it; newest first, without repeats."""
        self.ensure_tables()
        key = prefix_or_origin.strip()
        query = (
            sa.select(PREDICTIONS.c.sha256)
            .where(sa.or_(PREDICTIONS.c.sha256.startswith(key.lower()), PREDICTIONS.c.origin == key))
            .order_by(PREDICTIONS.c.id.desc())
        )
        with self.engine.connect() as conn:
            found = [r[0] for r in conn.execute(query)]
        return list(dict.fromkeys(found))

    def logged_sha256s(self, sha256s: Sequence[str], *, source: str, model_name: str, model_version: str) -> set[str]:
        """Which of ``sha256s`` the log already holds for ``source`` and that model name and version (one query per
        500 hashes: a re-run of a batch logs only what is new)."""
        self.ensure_tables()
        t = PREDICTIONS
        found: set[str] = set()
        wanted = list(dict.fromkeys(sha256s))
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), 500):
                query = sa.select(t.c.sha256).where(
                    t.c.source == source, t.c.model_name == model_name, t.c.model_version == model_version,
                    t.c.sha256.in_(wanted[i : i + 500]),
                )  # fmt: skip
                found.update(r[0] for r in conn.execute(query))
        return found

    def count(self) -> int:
        self.ensure_tables()
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(PREDICTIONS)).scalar_one())

    def _read(self, table: sa.Table, *, since: datetime | None, sha256: str | None) -> Any:
        import pandas as pd  # lazy: the scoring server's hook never reads

        self.ensure_tables()
        query = sa.select(table).order_by(table.c.id)
        if since is not None:
            query = query.where(table.c.ts > since)
        if sha256 is not None:
            query = query.where(table.c.sha256 == sha256)
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=[c.name for c in table.columns])
        if "ts" in frame.columns and len(frame):
            frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
        return frame

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    """Write-ahead log and synchronous=NORMAL for SQLite: a commit no longer waits for two fsyncs (the serving hook's
    writer commits a few times a second), and a crashed process still loses no committed transaction (an operating
    system crash may lose the last ones, never corrupt the file)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    except Exception:  # a read-only file or folder: leave the defaults, writes will say why they fail
        pass
    finally:
        cursor.close()


def _already_exists(exc: BaseException) -> bool:
    """Whether a failed CREATE lost a race to another creator (SQLite: "table/index ... already exists";
    PostgreSQL: DuplicateTable, or a duplicate key in pg_type when both CREATE at once)."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "already exists" in text or ("duplicate key" in text and "pg_type" in text)


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__


class LogWriter:
    """Batches rows to a :class:`PredictionLog` on a background thread; :meth:`record` never blocks or raises.

    A batch is written when ``batch_size`` rows are pending or ``flush_interval_s`` has passed. A failed write keeps
    the rows pending (they are retried at the next flush; one warning until a write succeeds again); more than
    ``max_pending`` pending rows: the oldest are dropped and counted in ``stats["dropped"]``. :meth:`close` flushes
    what it can (bounded by ``close_timeout_s``).
    """

    def __init__(
        self,
        store: PredictionLog,
        *,
        batch_size: int = 64,
        flush_interval_s: float = 1.0,
        max_pending: int = 10000,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self._pending: deque[dict[str, Any]] = deque()  # rows already converted (as_record)
        self._later: deque[Callable[[], PredictionRow]] = deque()  # rows the writer thread builds (record_later)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time: the thread's and a caller's never share a batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._write_through = False  # set by write_through(): every row is written before record returns
        self.stats = {"written": 0, "dropped": 0, "failed_writes": 0}
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._later)

    def record(self, row: PredictionRow) -> None:
        """Queue one row (never raises: a bad row is logged and dropped)."""
        record = self._convert(row)
        if record is None:
            return
        with self._lock:
            self._pending.append(record)
            full = self._bound()
        if self._write_through:
            self.flush()
        elif full:
            self._wake.set()

    def write_through(self) -> None:
        """From now on write each row before :meth:`record` returns (what is pending first). For a process on its
        way out (the scoring server on SIGTERM): the requests it still finishes are logged though it runs no exit
        handlers. Never raises."""
        self._write_through = True
        try:
            self.flush()
        except Exception:  # the flush keeps its rows on failure; a stop must go on
            log.exception("prediction log: flush on stop failed")

    def record_later(self, build: Callable[[], PredictionRow]) -> None:
        """Queue a row that the writer thread builds (``build()``) before its next write: what the row costs to make
        (hashing the file, image statistics) leaves the caller's thread — the scoring server's request path. A
        ``build`` that raises drops that row (logged, counted). Never raises itself."""
        with self._lock:
            self._later.append(build)
            full = self._bound()
        if self._write_through:
            self.flush()
        elif full:
            self._wake.set()

    def _convert(self, row: PredictionRow) -> dict[str, Any] | None:
        try:
            return row.as_record()  # a row the table cannot take is refused here, not in a batch with good ones
        except Exception:
            log.exception("prediction log: a row could not be logged")
            self.stats["dropped"] += 1
            return None

    def _bound(self) -> bool:
        """Drop the oldest rows beyond ``max_pending`` (counted); True when a batch is full. Under ``_lock``."""
        while len(self._pending) + len(self._later) > self.max_pending:
            (self._pending or self._later).popleft()
            self.stats["dropped"] += 1
        return len(self._pending) + len(self._later) >= self.batch_size

    def _build_later(self) -> None:
        """Turn the rows queued by :meth:`record_later` into records (on the flushing thread; even while the store
        is down, so that what they hold — file bytes, images — is let go at once)."""
        while True:
            with self._lock:
                if not self._later:
                    return
                builds = list(self._later)
                self._later.clear()
            records = []
            for build in builds:
                try:
                    row = build()
                except Exception:
                    log.exception("prediction log: a row could not be built")
                    self.stats["dropped"] += 1
                    continue
                record = self._convert(row)
                if record is not None:
                    records.append(record)
            with self._lock:
                self._pending.extend(records)
                self._bound()

    def record_many(self, rows: Iterable[PredictionRow]) -> None:
        for row in rows:
            self.record(row)

    def flush(self) -> bool:
        """Write everything pending now, in batches; True when nothing is left pending."""
        with self._flush_lock:
            return self._flush(full_only=False)

    def _flush(self, *, full_only: bool) -> bool:
        """Write pending rows in batches (``full_only``: only whole batches; the rest waits for the interval)."""
        self._build_later()
        while True:
            with self._lock:
                n = len(self._pending)
                if full_only and n < self.batch_size:
                    return n == 0
                batch = [self._pending[i] for i in range(min(self.batch_size, n))]
            if not batch:
                return True
            try:
                self.store.write(batch)
            except Exception as exc:  # unreachable, read-only, locked: keep the rows, say so once
                self.stats["failed_writes"] += 1
                if not self._failing:
                    log.warning("prediction log unavailable (%s): %d rows kept, retrying", exc, self.pending)
                    self._failing = True
                return False
            with self._lock:
                for _ in batch:
                    if self._pending:
                        self._pending.popleft()
            self.stats["written"] += len(batch)
            if self._failing:
                log.warning("prediction log available again")
                self._failing = False

    def _run(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.flush_interval_s)  # True: a full batch (or close); False: the interval
            self._wake.clear()
            with self._flush_lock:
                self._flush(full_only=woken and not self._stop.is_set())

    def close(self, close_timeout_s: float = 5.0) -> None:
        """Stop the thread and flush what is pending (rows still pending after the timeout count as dropped)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(close_timeout_s)
        deadline = time.monotonic() + close_timeout_s
        while self.pending and time.monotonic() < deadline:
            if not self.flush():
                time.sleep(0.1)
        if self.pending:
            self.stats["dropped"] += self.pending
            log.warning("prediction log: %d rows could not be written and are dropped", self.pending)
            self._pending.clear()
            self._later.clear()
