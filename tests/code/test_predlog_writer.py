"""The prediction log's background writer (:class:`emassist.data.predlog.LogWriter`) on real SQLite files: rows
written in batches of ``batch_size``, kept and retried while the store cannot be opened, the oldest dropped and
counted beyond ``max_pending``, and a row the table cannot take refused without raising."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from emassist.data.predlog import LogWriter, PredictionLog, PredictionRow

WAIT_S = 20.0  # generous bound for the background thread on a busy machine; never a timing assertion


class CountingLog(PredictionLog):
    """The real store, remembering the size of every successful write (one transaction each)."""

    def __init__(self, db_uri: str) -> None:
        super().__init__(db_uri)
        self.batches: list[int] = []

    def write(self, rows: Sequence[Any]) -> int:
        n = super().write(rows)
        self.batches.append(n)
        return n


def row(i: int, source: str = "cli") -> PredictionRow:
    return PredictionRow(
        source=source,
        sha256=f"{i:064x}",
        label="Fibres",
        confidence=0.5 + i / 1000,
        probabilities={"Fibres": 0.6, "Tips": 0.4},
        needs_review=False,
        origin=f"img{i}.png",
    )


def wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_rows_are_written_in_batches_of_batch_size(tmp_path: Path) -> None:
    store = CountingLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(store, batch_size=5, flush_interval_s=3600, max_pending=100)  # only a full batch wakes it
    writer.record_many(row(i) for i in range(12))
    assert wait_for(lambda: writer.stats["written"] == 10)
    assert store.batches == [5, 5] and writer.pending == 2  # the last two wait for a full batch or close
    writer.close()
    assert store.batches == [5, 5, 2] and writer.stats == {"written": 12, "dropped": 0, "failed_writes": 0}
    frame = store.predictions()
    assert list(frame["origin"]) == [f"img{i}.png" for i in range(12)]  # in order, each once
    assert frame["sha256"].is_unique


def test_store_down_keeps_rows_warns_once_and_retries_when_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tests run as root, where a read-only folder still takes writes: a database whose folder does not exist yet
    # is a store that cannot be opened, until the folder is made.
    folder = tmp_path / "not-yet"
    store = PredictionLog(f"sqlite:///{folder / 'log.db'}")
    writer = LogWriter(store, batch_size=100, flush_interval_s=3600, max_pending=100)  # flushed by hand only
    caplog.set_level(logging.WARNING, logger="emassist.data.predlog")
    writer.record_many(row(i) for i in range(7))
    assert writer.flush() is False and writer.flush() is False and writer.flush() is False
    assert writer.pending == 7 and writer.stats["written"] == 0 and writer.stats["failed_writes"] == 3
    assert len(warnings_of(caplog, "prediction log unavailable")) == 1  # one warning, not one per attempt
    folder.mkdir()
    writer.record(row(7))
    assert writer.flush() is True
    assert writer.pending == 0 and writer.stats["written"] == 8 and writer.stats["dropped"] == 0
    assert warnings_of(caplog, "available again")
    writer.close()
    assert sorted(PredictionLog(store.db_uri).predictions()["origin"]) == sorted(f"img{i}.png" for i in range(8))


def test_beyond_max_pending_the_oldest_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    folder = tmp_path / "absent"
    store = PredictionLog(f"sqlite:///{folder / 'log.db'}")
    writer = LogWriter(store, batch_size=100, flush_interval_s=3600, max_pending=5)
    writer.record_many(row(i) for i in range(8))
    assert writer.flush() is False
    assert writer.pending == 5 and writer.stats["dropped"] == 3
    folder.mkdir()
    writer.close()
    assert writer.stats["written"] == 5 and writer.stats["dropped"] == 3
    kept = list(PredictionLog(store.db_uri).predictions()["origin"])
    assert kept == [f"img{i}.png" for i in range(3, 8)]  # the newest five


def test_close_counts_rows_it_could_not_write_as_dropped(tmp_path: Path) -> None:
    writer = LogWriter(PredictionLog(f"sqlite:///{tmp_path / 'never' / 'log.db'}"), batch_size=100,
                       flush_interval_s=3600)  # fmt: skip
    writer.record_many(row(i) for i in range(4))
    writer.close(close_timeout_s=0.3)
    assert writer.pending == 0 and writer.stats["dropped"] == 4 and writer.stats["written"] == 0


def test_a_row_the_table_cannot_take_is_refused_without_raising(tmp_path: Path) -> None:
    store = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(store, batch_size=100, flush_interval_s=3600)
    writer.record(row(0, source="telepathy"))  # not one of web|cli|scan|server
    writer.record(row(1))
    writer.close()
    assert writer.stats == {"written": 1, "dropped": 1, "failed_writes": 0}
    assert list(store.predictions()["origin"]) == ["img1.png"]


def test_rows_recorded_later_are_built_on_the_writer_thread_and_kept_while_the_store_is_down(tmp_path: Path) -> None:
    """record_later (the scoring server's path): the caller only queues; the writer thread builds the row (even
    while the store is down, so what the builder holds is let go), a builder that raises costs that row only."""
    folder = tmp_path / "absent"
    store = PredictionLog(f"sqlite:///{folder / 'log.db'}")
    writer = LogWriter(store, batch_size=100, flush_interval_s=3600, max_pending=100)
    built_on: list[str] = []

    def later(i: int) -> Callable[[], PredictionRow]:
        def build() -> PredictionRow:
            built_on.append(threading.current_thread().name)
            if i == 2:
                raise RuntimeError("a bug in one row's facts")
            return row(i)

        return build

    for i in range(5):
        writer.record_later(later(i))
    assert built_on == [] and writer.pending == 5  # nothing built by the caller
    done = threading.Event()
    thread = threading.Thread(target=lambda: (writer.flush(), done.set()), name="flusher")
    thread.start()
    thread.join(WAIT_S)
    assert done.is_set() and built_on == ["flusher"] * 5  # built by whoever flushes, not by record_later's caller
    assert writer.pending == 4 and writer.stats["dropped"] == 1  # built and kept while the store is down
    folder.mkdir()
    writer.record(row(9))
    writer.close()
    assert writer.stats == {"written": 5, "dropped": 1, "failed_writes": 1}
    assert sorted(PredictionLog(store.db_uri).predictions()["origin"]) == [f"img{i}.png" for i in (0, 1, 3, 4, 9)]


def test_rows_recorded_later_count_towards_max_pending_and_a_full_batch(tmp_path: Path) -> None:
    store = CountingLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(store, batch_size=4, flush_interval_s=3600, max_pending=100)  # only a full batch wakes it
    for i in range(4):
        writer.record_later(lambda i=i: row(i))
    assert wait_for(lambda: writer.stats["written"] == 4)
    writer.close()
    bounded = LogWriter(PredictionLog(f"sqlite:///{tmp_path / 'no' / 'log.db'}"), batch_size=100,
                        flush_interval_s=3600, max_pending=3)  # fmt: skip
    for i in range(5):
        bounded.record_later(lambda i=i: row(i))
    assert bounded.pending == 3 and bounded.stats["dropped"] == 2
    bounded.close(close_timeout_s=0.2)


def test_write_through_writes_pending_rows_and_each_later_row_before_record_returns(tmp_path: Path) -> None:
    store = CountingLog(f"sqlite:///{tmp_path / 'log.db'}")
    writer = LogWriter(store, batch_size=100, flush_interval_s=3600, max_pending=100)  # the thread never flushes
    writer.record(row(0))
    writer.record_later(lambda: row(1))
    assert writer.stats["written"] == 0
    writer.write_through()
    assert writer.stats["written"] == 2 and writer.pending == 0
    writer.record(row(2))
    assert writer.stats["written"] == 3  # written before record returned
    writer.record_later(lambda: row(3))
    assert writer.stats["written"] == 4 and store.batches == [2, 1, 1]
    writer.close()
