"""A crash loses no committed row and leaves no half batch: a real writer process (LogWriter on an SQLite file) is
killed with SIGKILL while it writes, then the database is opened again.

The writer tags each transaction's rows with the transaction's number and size just before inserting them and
prints ``committed <tx> <rows> <total>`` after each commit. After the kill every transaction present must be
complete, numbered 1..k without gaps, and the total must be what it printed, or that plus the one transaction it
committed but had no time to report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from emassist.data.predlog import PredictionLog
from tests.helpers import REPO_ROOT

WRITER = textwrap.dedent(
    """
    import sys

    import sqlalchemy as sa
    from emassist.data.predlog import LogWriter, PredictionLog, PredictionRow

    class Tagging(PredictionLog):
        tx = 0
        total = 0

        def write(self, rows):
            self.tx += 1
            tag = f"tx={self.tx};n={len(rows)}"
            for row in rows:  # the transaction's number and size, in every row it holds (a row or its record)
                if isinstance(row, dict):
                    row["origin"] = tag
                else:
                    row.origin = tag
            print(f"begin {self.tx} {len(rows)} {self.total}", flush=True)
            n = super().write(rows)  # one transaction: committed when this returns
            self.total += n
            print(f"committed {self.tx} {n} {self.total}", flush=True)
            return n

    store = Tagging(sys.argv[1])

    @sa.event.listens_for(store.engine, "connect")
    def small_cache(dbapi_connection, _record):  # pages spill to the file mid-transaction: a kill leaves a hot journal
        dbapi_connection.execute("PRAGMA cache_size=8")

    writer = LogWriter(store, batch_size=int(sys.argv[2]), flush_interval_s=3600, max_pending=10**7)
    i = 0
    while True:
        for _ in range(200):
            writer.record(PredictionRow(source="cli", sha256=f"{i:064x}", label="Fibres", confidence=0.9,
                                        probabilities={"Fibres": 0.9, "Tips": 0.1}, needs_review=False))
            i += 1
        while writer.pending > 4 * writer.batch_size:  # keep the queue short: the writer thread is the bottleneck
            pass
    """
)


def run_and_kill(db: Path, batch_size: int, kill_after: int, delay_s: float) -> list[tuple[int, int, int]]:
    """Start the writer; once it has reported ``kill_after`` commits, SIGKILL it ``delay_s`` after it says it
    begins the next transaction (inside it, most of the time). Returns its commit reports ``(tx, n, total)``."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, f"sqlite:///{db}", str(batch_size)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    reports: list[tuple[int, int, int]] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            what, tx, n, total = line.split()
            if what == "committed":
                reports.append((int(tx), int(n), int(total)))
            elif len(reports) >= kill_after:  # "begin" of the next one
                time.sleep(delay_s)
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the writer is too slow"
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for line in rest.splitlines():  # a report printed between our read and the kill
        what, tx, n, total = line.split()
        if what == "committed":
            reports.append((int(tx), int(n), int(total)))
    assert proc.returncode == -signal.SIGKILL, f"the writer ended by itself ({proc.returncode}): {err[-2000:]}"
    return reports


@pytest.mark.parametrize(("batch_size", "kill_after", "delay_s"), [(400, 3, 0.0), (2000, 2, 0.03)])
def test_sigkill_mid_write_loses_no_committed_row_and_no_batch_is_partial(
    tmp_path: Path, batch_size: int, kill_after: int, delay_s: float
) -> None:
    db = tmp_path / "log.db"
    reports = run_and_kill(db, batch_size, kill_after, delay_s)
    assert len(reports) >= kill_after
    reported_total = reports[-1][2]

    frame = PredictionLog(f"sqlite:///{db}").predictions()  # opening rolls back whatever the kill interrupted
    sizes = frame["origin"].str.extract(r"tx=(\d+);n=(\d+)").astype(int)
    per_tx = sizes.groupby(0)[1].agg(["first", "size"])
    assert (per_tx["first"] == per_tx["size"]).all(), f"a partial transaction survived:\n{per_tx}"
    assert list(per_tx.index) == list(range(1, len(per_tx) + 1))  # no gap: every committed transaction is there
    assert frame["sha256"].is_unique  # no row twice
    n_reported = len(reports)
    assert len(per_tx) in (n_reported, n_reported + 1)  # + the one committed but killed before it could print
    expected = reported_total + (int(per_tx["size"].iloc[-1]) if len(per_tx) > n_reported else 0)
    assert len(frame) == expected
    assert expected >= kill_after * batch_size * 0.5  # really mid-run, with many rows behind it
