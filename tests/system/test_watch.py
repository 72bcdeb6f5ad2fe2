"""``emassist watch`` as a real process against the session's small champion (a sqlite registry; see
tests/watch_support.py): chunked writes, rename-into-place, a 500-file burst, the alert receiver, bad inputs, the
folder vanishing and coming back, kill -9 mid-burst and a restart in polling mode.

One watcher process serves the tests in file order (they share its folder); the kill test stops it hard and the
polling watcher takes over the same folder and state file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("keras")
pytest.importorskip("mlflow")
pytest.importorskip("watchdog")

pytestmark = pytest.mark.slow

from tests import watch_support as wt  # noqa: E402
from tests import webapp_support as ws  # noqa: E402
from tests.helpers import SmallModel  # noqa: E402
from tests.servers import stop_process  # noqa: E402

TARGET = ws.RIGHT  # "Particles": the needle the alert looks for


class Session:
    """The module's watched folder, its results folder and the watcher process currently running."""

    def __init__(self, champion: ws.Champion, folder: Path, out: Path, receiver: wt.AlertReceiver) -> None:
        self.champion, self.folder, self.out, self.receiver = champion, folder, out, receiver
        self.params = wt.write_params(champion)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = champion.root / "watch-0.log"
        self.n = 0

    def start(self, *extra: str) -> None:
        self.n += 1
        self.log = self.champion.root / f"watch-{self.n}.log"
        self.proc = wt.start_watcher(
            self.champion, self.params, self.folder, self.log, "--out", str(self.out), "--sort",
            "--alert", TARGET, "--alert-url", self.receiver.url, *extra,
        )  # fmt: skip

    def wait_rows(self, relpaths: list[str], timeout: float = 30) -> list[dict[str, Any]]:
        want = set(relpaths)

        def done() -> list[dict[str, Any]] | None:
            rows = [r for r in wt.results(self.out) if r["relpath"] in want]
            return rows if {r["relpath"] for r in rows} == want else None

        return wt.wait_for(done, timeout, self.proc, self.log, f"{len(want)} results")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, small_model: SmallModel) -> Iterator[Session]:
    champion = ws.register_champion(tmp_path_factory.mktemp("watch"), small_model)
    folder = champion.root / "microscope"
    folder.mkdir()
    (folder / "before.png").write_bytes(wt.png_bytes(ws.LEFT, 900))  # there before the watcher: caught up
    with wt.AlertReceiver() as receiver:
        s = Session(champion, folder, champion.root / "results", receiver)
        s.start()
        try:
            yield s
        finally:
            if s.proc is not None:
                stop_process(s.proc)


def test_catch_up_chunks_and_rename_into_place(session: Session) -> None:
    s = session
    s.wait_rows(["before.png"])
    # written in three chunks with pauses shorter than settle_s: answered once, from the complete bytes
    data = wt.png_bytes(ws.LEFT, 901)
    path = s.folder / "chunked.png"
    with open(path, "wb") as fh:
        for k in range(3):
            fh.write(data[k * len(data) // 3 : (k + 1) * len(data) // 3])
            fh.flush()
            time.sleep(0.3)
    # the instrument's temporary name, then the rename: the final name only
    (s.folder / "renamed.png.part").write_bytes(wt.png_bytes(ws.RIGHT, 902))
    time.sleep(1.0)  # longer than settle_s: a .part file is never read however long it waits
    os.rename(s.folder / "renamed.png.part", s.folder / "renamed.png")
    rows = s.wait_rows(["chunked.png", "renamed.png"])
    import hashlib

    chunked = [r for r in rows if r["relpath"] == "chunked.png"]
    assert len(chunked) == 1 and chunked[0]["status"] == "classified"
    assert chunked[0]["sha256"] == hashlib.sha256(data).hexdigest()  # the whole file, not a part of it
    assert not [r for r in wt.results(s.out) if r["relpath"].endswith(".part")]
    by_path = {r["relpath"]: r for r in rows}
    # the watcher's answers are emassist predict's for the same files (the small model is not always right: its
    # training is seeded but TensorFlow's CPU kernels are not deterministic, so the true class would be flaky)
    from emassist.serve.predict import predict_paths

    files = [s.folder / "renamed.png", s.folder / "chunked.png"]
    expected = predict_paths(files, s.champion.model_file, params=s.champion.params, progress=False)
    for path, label, confidence in zip(expected["path"], expected["label"], expected["confidence"], strict=True):
        got = by_path[Path(path).name]
        assert got["label"] == label and abs(float(got["confidence"]) - float(confidence)) < 1e-5, (path, got)
    sorted_as = by_path["renamed.png"]["label"]
    assert (s.out / sorted_as / "renamed.png").read_bytes() == (s.folder / "renamed.png").read_bytes()  # --sort


def test_burst_of_500_each_classified_exactly_once_and_the_alert_fires_for_the_target_only(
    session: Session,
) -> None:
    s = session
    burst = s.folder / "burst"
    burst.mkdir()
    names = []
    for i in range(500):
        cls = ws.CLASSES[i % 3]
        (burst / f"img{i:03d}.png").write_bytes(wt.png_bytes(cls, 1000 + i))
        names.append(f"burst/img{i:03d}.png")
    s.wait_rows(names, timeout=90)
    counts = Counter(r["relpath"] for r in wt.results(s.out) if r["relpath"].startswith("burst/"))
    assert len(counts) == 500 and set(counts.values()) == {1}
    rows = [r for r in wt.results(s.out) if r["relpath"].startswith(("burst/", "renamed", "chunked", "before"))]
    assert all(r["status"] == "classified" for r in rows)
    want = {r["relpath"] for r in rows if r["label"] == TARGET and r["confidence"] >= wt.FAST_WATCH["min_confidence"]}
    assert len(want) > 100  # a third of the burst is the target class
    wt.wait_for(lambda: {m["relpath"] for m in s.receiver.messages} >= want, 20, what="the alert POSTs")
    alerted = [m["relpath"] for m in s.receiver.messages]
    assert sorted(alerted) == sorted(want)  # each once, none for the other classes
    assert all(m["label"] == TARGET and m["event"] == "alert" for m in s.receiver.messages)
    assert "ALERT Particles" in s.log.read_text()


def test_bad_inputs_get_a_row_or_a_line_and_the_watcher_keeps_going(session: Session) -> None:
    s = session
    (s.folder / "notes.png").write_text("sample 14, stage tilt 30 degrees\n")  # an image name, text content
    png = wt.png_bytes(ws.LEFT, 950)
    (s.folder / "stuck.png").write_bytes(png[: len(png) // 2])  # a half-written file that never completes
    (s.folder / "empty.tif").write_bytes(b"")
    gone = s.folder / "gone.png"
    gone.write_bytes(png)
    gone.unlink()  # deleted before it was read
    os.symlink("loop.png", s.folder / "loop.png")  # a symbolic link loop
    os.symlink(".", s.folder / "here")  # a folder link back to itself: never followed
    names = ["notes.png", "stuck.png", "empty.tif", "loop.png"]
    unreadable = None
    if os.geteuid() != 0:  # root reads a chmod 000 file anyway
        unreadable = s.folder / "locked.png"
        unreadable.write_bytes(png)
        unreadable.chmod(0)
        names.append("locked.png")
    rows = {r["relpath"]: r for r in s.wait_rows(names, timeout=30)}
    assert rows["notes.png"]["status"] == "rejected"
    assert rows["notes.png"]["error"] == "not an image (content is text)"  # the ingest's reason
    assert (s.out / "_rejected" / "notes.png").exists()  # --sort: quarantined as a copy
    assert rows["stuck.png"]["status"] == "incomplete" and "truncated" in rows["stuck.png"]["error"]
    assert rows["empty.tif"]["status"] == "incomplete" and "zero-byte" in rows["empty.tif"]["error"]
    assert rows["loop.png"]["status"] == "unreadable" and "symbolic links" in rows["loop.png"]["error"]
    if unreadable is not None:
        assert rows["locked.png"]["error"] == "unreadable: permission denied"
    assert "gone.png" not in {r["relpath"] for r in wt.results(s.out)}
    # the user's files are only read
    assert (s.folder / "notes.png").read_text().startswith("sample 14")
    assert (s.folder / "stuck.png").read_bytes() == png[: len(png) // 2]
    # and the watcher still answers
    (s.folder / "after-bad.png").write_bytes(wt.png_bytes(ws.RIGHT, 951))
    assert s.wait_rows(["after-bad.png"])[0]["status"] == "classified"
    assert s.proc is not None and s.proc.poll() is None


def test_folder_disappears_and_comes_back(session: Session) -> None:
    s = session
    away = s.folder.with_name("microscope-away")
    os.rename(s.folder, away)
    wt.wait_for(lambda: "is gone" in s.log.read_text(), 10, s.proc, s.log, "the folder-gone line")
    os.rename(away, s.folder)
    wt.wait_for(lambda: "is back" in s.log.read_text(), 10, s.proc, s.log, "the folder-back line")
    (s.folder / "back.png").write_bytes(wt.png_bytes(ws.LEFT, 960))
    assert s.wait_rows(["back.png"])[0]["status"] == "classified"


def test_kill_9_mid_burst_then_restart_polling_no_duplicates_no_misses(session: Session) -> None:
    s = session
    assert s.proc is not None
    burst = s.folder / "burst2"
    burst.mkdir()
    names = [f"burst2/img{i:03d}.png" for i in range(300)]
    for i, name in enumerate(names):
        (s.folder / name).write_bytes(wt.png_bytes(ws.CLASSES[i % 3], 2000 + i))
    wt.wait_for(lambda: sum(r["relpath"].startswith("burst2/") for r in wt.results(s.out)) >= 40, 30, s.proc, s.log,
                "the first answers of the burst")  # fmt: skip
    os.killpg(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    done_before = sum(r["relpath"].startswith("burst2/") for r in wt.results(s.out))
    assert done_before < 300  # killed mid-burst
    for i in range(300, 350):  # copied in while the watcher was down
        name = f"burst2/img{i:03d}.png"
        (s.folder / name).write_bytes(wt.png_bytes(ws.CLASSES[i % 3], 2000 + i))
        names.append(name)
    s.start("--poll")
    s.wait_rows(names, timeout=60)
    counts = Counter(r["relpath"] for r in wt.results(s.out))
    assert [p for p, n in counts.items() if n > 1] == []  # nothing answered twice, before the kill or after
    assert all(counts[n] == 1 for n in names)
    # polling mode sees a new file too
    (s.folder / "polled.png").write_bytes(wt.png_bytes(ws.RIGHT, 970))
    assert s.wait_rows(["polled.png"])[0]["status"] == "classified"
    # a clean stop on SIGTERM
    os.killpg(s.proc.pid, signal.SIGTERM)
    assert s.proc.wait(30) == 0
    text = s.log.read_text()
    assert "stopped:" in text and "Traceback" not in text
    s.proc = None


def test_answers_are_in_the_prediction_log_as_watch(session: Session) -> None:
    from emassist.data.predlog import PredictionLog

    store = PredictionLog(ws.monitoring_uri(session.champion.root))
    try:
        frame = store.predictions()
    finally:
        store.dispose()
    watched = frame[frame["source"] == "watch"]
    classified = [r for r in wt.results(session.out) if r["status"] == "classified"]
    assert len(watched) >= 0.9 * len(classified)  # a kill -9 may lose the last second of queued log rows
    assert len(watched) <= len(classified)
    repeated = watched["origin"].value_counts()
    assert list(repeated[repeated > 1].index) == []  # each file logged once: no file here was answered twice
    assert set(watched["origin"]) <= {r["path"] for r in classified} | {str(Path(r["path"])) for r in classified}
    assert (watched["model_name"] == ws.MODEL_NAME).all()


def test_results_csv_matches_the_jsonl(session: Session) -> None:
    import csv

    with open(session.out / "results.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert Counter(r["path"] for r in rows) == Counter(r["path"] for r in wt.results(session.out))
    classified = [r for r in rows if r["status"] == "classified"]
    assert classified and all(abs(sum(float(r[c]) for c in ws.CLASSES) - 1) < 1e-3 for r in classified)
