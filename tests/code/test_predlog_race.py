"""Two creators of the prediction log's tables at once (issue: "table predictions already exists").

``create_all`` checks whether each table exists, then creates it. A second creator that runs between the check and
the CREATE (another store on the same file in this process, e.g. the page's store and its log writer's; or another
process) made the first one fail. The SQLAlchemy ``before_create`` event fires exactly in that gap, so the tests put
the other creator there: deterministic, a real SQLite file, a real second process or thread.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from emassist.data.predlog import PREDICTIONS, PredictionLog


def _in_the_gap(other: Any) -> Any:
    """A ``before_create`` listener that runs ``other()`` once, after the check found the table missing."""
    done: list[bool] = []

    def hook(*_: Any, **__: Any) -> None:
        if not done:
            done.append(True)
            other()

    return hook


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_a_create_that_loses_to_another_process_checks_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    code = "import sys; from emassist.data.predlog import PredictionLog; PredictionLog(sys.argv[1]).ensure_tables()"

    def other_process() -> None:  # creates every table while this one is between its check and its CREATE
        subprocess.run([sys.executable, "-c", code, url], check=True, timeout=60, cwd=Path(__file__).parents[2])

    hook = _in_the_gap(other_process)
    sa.event.listen(PREDICTIONS, "before_create", hook)
    try:
        store = PredictionLog(url)
        store.ensure_tables()  # before the fix: PredictionLogError "table predictions already exists"
    finally:
        sa.event.remove(PREDICTIONS, "before_create", hook)
    try:
        assert {"predictions", "corrections"} <= _tables(url)
        assert store.count() == 0  # usable
    finally:
        store.dispose()


def test_two_stores_of_one_process_creating_at_once_both_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    second = PredictionLog(url)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            second.ensure_tables()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=create)

    def other_thread() -> None:  # the second store's creation, started in the first one's gap
        thread.start()
        thread.join(timeout=1.0)  # before the fix it finishes here, and the first one's CREATE then fails

    hook = _in_the_gap(other_thread)
    sa.event.listen(PREDICTIONS, "before_create", hook)
    first = PredictionLog(url)
    try:
        first.ensure_tables()
    finally:
        sa.event.remove(PREDICTIONS, "before_create", hook)
        thread.join(timeout=30)
    try:
        assert not thread.is_alive() and errors == []
        assert {"predictions", "corrections"} <= _tables(url)
        assert first.count() == 0 and second.count() == 0
    finally:
        first.dispose()
        second.dispose()
