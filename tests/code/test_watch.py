"""The watcher's parts without a model: the settle rule (a fake clock), ignored names, the catch-up walk over a
link loop, the state file across restarts, results recovery after a hard stop, the alert's decision; the watcher
in-process with a fake scorer (rescans during a burst, a failing state file, a failing settler), and the Live tab's
event ids across a server restart."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from emassist.config.settings import Params, WatchParams
from emassist.pipeline.watch import Watcher, WatchOptions, default_out
from emassist.pipeline.watch_files import Tracker, ignored_name, still_writing, walk_files
from emassist.pipeline.watch_outputs import Alerter, Results, sort_copy
from emassist.pipeline.watch_state import Done, WatchState, stat_sig


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _tracker(clock: Clock, settle: float = 1.0, timeout: float = 5.0) -> Tracker:
    # wall: far in the past, so that only the observed stability counts (mtimes are "now" on this disk)
    return Tracker(settle, timeout, clock=clock, wall=lambda: 0.0)


def test_a_growing_file_ripens_only_after_settle_s_without_change(tmp_path: Path) -> None:
    clock = Clock()
    tracker = _tracker(clock)
    path = tmp_path / "a.tif"
    path.write_bytes(b"x" * 10)
    tracker.touch(path)
    assert tracker.scan(10) == ([], [])  # just seen
    clock.t += 0.6
    with open(path, "ab") as fh:
        fh.write(b"y" * 10)  # still growing
    assert tracker.scan(10)[0] == []
    clock.t += 0.6
    assert tracker.scan(10)[0] == []  # 0.6 s since the change
    clock.t += 0.5
    ripe, lapses = tracker.scan(10)
    assert [r.path for r in ripe] == [path] and lapses == []
    assert ripe[0].sig == stat_sig(os.stat(path))


def test_a_truncated_file_waits_for_a_change_then_times_out_incomplete(tmp_path: Path) -> None:
    clock = Clock()
    tracker = _tracker(clock)
    path = tmp_path / "half.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n half")
    tracker.touch(path)
    assert tracker.scan(10) == ([], [])  # the first look starts the settle clock
    clock.t += 1.1
    (ripe,), _ = tracker.scan(10)
    tracker.not_yet(path, ripe.sig, "truncated PNG: image file is truncated")
    clock.t += 1.0
    assert tracker.scan(10) == ([], [])  # the same bytes are not decoded twice
    clock.t += 3.0
    ripe_now, lapses = tracker.scan(10)
    assert ripe_now == [] and [(x.status, x.path) for x in lapses] == [("incomplete", path)]
    assert "incomplete after 5 s: truncated PNG" in lapses[0].reason
    assert len(tracker) == 0


def test_empty_deleted_and_looping_files(tmp_path: Path) -> None:
    clock = Clock()
    tracker = _tracker(clock, timeout=2.0)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    gone = tmp_path / "gone.png"
    gone.write_bytes(b"x")
    loop = tmp_path / "loop.png"
    os.symlink("loop.png", loop)
    for p in (empty, gone, loop):
        tracker.touch(p)
    gone.unlink()
    clock.t += 3.0
    ripe, lapses = tracker.scan(10)
    assert ripe == []
    got = {x.path.name: (x.status, x.reason) for x in lapses}
    assert got["gone.png"] == ("gone", "deleted before it was read")
    assert got["empty.tif"][0] == "incomplete" and "zero-byte file" in got["empty.tif"][1]
    assert got["loop.png"][0] == "unreadable" and "symbolic links" in got["loop.png"][1]


def test_ignored_names_and_the_walk_over_a_link_loop(tmp_path: Path) -> None:
    assert ignored_name("scan.tif.part") and ignored_name(".hidden.png") and ignored_name("x.tmp")
    assert not ignored_name("scan.tif") and not ignored_name("notes.txt")
    assert still_writing("truncated TIFF: x") and still_writing("zero-byte file")
    assert not still_writing("not an image (content is text)")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"1")
    (tmp_path / "b.png.crdownload").write_bytes(b"2")
    os.symlink(".", tmp_path / "sub" / "again")  # a loop: never followed
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("x")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path, skip=tmp_path / "out"))
    assert files == ["sub/a.png"]  # the folder link is neither walked nor listed; ignored names and out/ left out


def test_default_out_is_beside_the_folder(tmp_path: Path) -> None:
    assert default_out(tmp_path / "session") == tmp_path / "session-emassist"


def test_state_survives_a_restart_and_keys_on_path_and_sha256(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"abc")
    st = os.stat(image)
    state = WatchState(tmp_path / "state.db")
    state.record([Done("a.png", "h1", stat_sig(st), "classified", "Fibres")], {"jsonl_offset": 10})
    state.close()
    again = WatchState(tmp_path / "state.db")
    assert again.seen_unchanged("a.png", st) and again.has("a.png", "h1")
    assert not again.has("a.png", "h2") and not again.has("b.png", "h1")
    assert again.offset("jsonl_offset") == 10
    image.write_bytes(b"abcd")  # new bytes: a new signature, not answered yet
    assert not again.seen_unchanged("a.png", os.stat(image))
    again.close()


def _record(rel: str, status: str = "classified") -> dict[str, object]:
    return {"time": "t", "path": f"/x/{rel}", "relpath": rel, "status": status, "label": "Fibres",
            "confidence": 0.9, "sha256": f"sha-{rel}", "sig": "1:2", "probabilities": {"Fibres": 0.9}}  # fmt: skip


def test_results_written_but_not_committed_are_recovered_and_a_cut_line_is_dropped(tmp_path: Path) -> None:
    state = WatchState(tmp_path / "state.db")
    results = Results(tmp_path, ["Fibres"])
    results.recover(state)
    offsets = results.append([_record("a.png")])
    state.record([Done("a.png", "sha-a.png", "1:2", "classified")], offsets)
    results.append([_record("b.png")])  # written and fsynced; the kill came before the state's commit
    results.close()
    with open(tmp_path / "results.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"relpath": "c.png", "sta')  # cut by the kill
    with open(tmp_path / "results.csv", "a", encoding="utf-8") as fh:
        fh.write("t,/x/c.png,classi")
    again = Results(tmp_path, ["Fibres"])
    assert again.recover(state) == 1
    assert state.has("b.png", "sha-b.png") and not state.has("c.png", "sha-c.png")
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["relpath"] for x in lines] == ["a.png", "b.png"]
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("time,path,status") and "/x/b.png" in csv_lines[2]
    again.close()
    state.close()


def test_sort_copy_keeps_subfolders_and_never_touches_the_source(tmp_path: Path) -> None:
    src = tmp_path / "in" / "day1" / "img.png"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"pixels")
    target = sort_copy(src, tmp_path / "out", "Fibres", "day1/img.png")
    assert target == tmp_path / "out" / "Fibres" / "day1" / "img.png" and target.read_bytes() == b"pixels"
    assert src.read_bytes() == b"pixels"


@pytest.mark.parametrize(("label", "confidence", "fires"), [("Tips", 0.95, True), ("Tips", 0.5, False),
                                                            ("Fibres", 0.99, False)])  # fmt: skip
def test_alert_fires_for_a_target_class_at_or_above_the_confidence(label: str, confidence: float, fires: bool) -> None:
    out = io.StringIO()
    alerter = Alerter(["Tips", "Nanowires"], 0.9, stream=out, color=False)
    record = {**_record("n.png"), "label": label, "confidence": confidence}
    assert alerter(record) is fires
    assert out.getvalue() == ("\aALERT Tips 0.950: /x/n.png\n" if fires else "")


def test_the_ignored_names_come_from_params(tmp_path: Path) -> None:
    from emassist.config.settings import WatchParams
    from emassist.pipeline.watch_files import ignore_rule

    rule = ignore_rule(WatchParams(ignore_suffixes=(".lock",), ignore_prefixes=("_",)))
    assert rule("scan.TIF.LOCK") and rule("_draft.png") and not rule("scan.tif.part") and not rule(".hidden.png")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png.lock").write_bytes(b"x")
    assert [p.name for p in walk_files(tmp_path, ignored=rule)] == ["a.png"]


# ---------------------------------------------------------------------------------------------- the watcher, in-process
# A fake scorer (no model): every file "decodes" to a blank image with its real sha256; answers take a little time,
# like a model, so that rescans and events land while files are in flight.


class _Facts:
    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256


class _Prepared:
    def __init__(self, path: str) -> None:
        self.image = np.zeros((4, 4), np.uint8)
        self.error = ""
        self.facts = _Facts(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        self.scale = None  # a model without the scale input


class FakeScorer:
    classes: ClassVar[list[str]] = ["A", "B"]
    familiarity_checked = False
    identity = None
    backend = SimpleNamespace(info=SimpleNamespace(name="fake", version="1", label="fake"))

    def __init__(self, seconds_per_image: float = 0.01) -> None:
        self.seconds_per_image = seconds_per_image
        self.prepared = 0

    def prepare(self, paths: list[str]) -> list[_Prepared]:
        self.prepared += len(paths)
        return [_Prepared(p) for p in paths]

    def answer(self, images: list[np.ndarray]) -> pd.DataFrame:
        time.sleep(self.seconds_per_image * len(images))
        n = len(images)
        return pd.DataFrame({"label": ["A"] * n, "confidence": [0.9] * n, "A": [0.9] * n, "B": [0.1] * n,
                             "error": [""] * n, "needs_review": [False] * n, "review_reason": [""] * n})  # fmt: skip


def _folder(tmp_path: Path, n: int) -> Path:
    """``n`` files already complete (an mtime well in the past: ripe at once)."""
    root = tmp_path / "microscope"
    root.mkdir()
    old = time.time() - 100
    for i in range(n):
        path = root / f"f{i:03d}.png"
        path.write_bytes(b"x%d" % i)
        os.utime(path, (old, old))
    return root


def _params(**watch: Any) -> Params:
    knobs = {"settle_s": 0.1, "incomplete_timeout_s": 5.0, "batch_size": 8, "queue_size": 8, "rescan_s": 0.2,
             "max_wait_s": 0.05, **watch}  # fmt: skip
    return dataclasses.replace(Params(), watch=WatchParams(**knobs))


def _run_once(watcher: Watcher, timeout: float = 20.0) -> None:
    """``watcher.run()`` with ``once``, failing (not hanging) when it does not finish."""
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        watcher.stop()
        thread.join(5)
        raise AssertionError(f"the watcher did not finish within {timeout:g} s (a thread died?)")


def _jsonl(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_rescans_during_a_burst_answer_each_file_once(tmp_path: Path) -> None:
    root = _folder(tmp_path, 60)
    notified: list[str] = []
    lines: list[str] = []
    watcher = Watcher(WatchOptions(folder=root, once=True), _params(), FakeScorer(0.02), say=lines.append,
                      listeners=[lambda record, image: notified.append(record["relpath"])])  # fmt: skip
    _run_once(watcher)
    rows = Counter(r["relpath"] for r in _jsonl(default_out(root)))
    assert len(rows) == 60 and set(rows.values()) == {1}, [p for p, n in rows.items() if n > 1]
    assert Counter(notified) == rows  # the Live tab / alerts: once each too
    assert sum(line.endswith(": A 0.900") for line in lines) == 60
    assert watcher.stats.classified == 60 and watcher.stats.seen == 60  # the rescans found them again
    assert watcher.stats.skipped == 0  # "answered before": by an earlier run, not by this one
    state = WatchState(default_out(root) / WatchParams().state_file)
    assert state.count("classified") == 60
    state.close()


def test_an_event_for_a_file_in_flight_tracks_it_again_only_after_its_record(tmp_path: Path) -> None:
    clock = Clock()
    tracker = _tracker(clock, settle=0.0)
    path = tmp_path / "a.png"
    path.write_bytes(b"x")
    tracker.touch(path)
    (ripe,), _ = tracker.scan(10)
    tracker.done(ripe.path, hold=True)  # queued for the sink
    tracker.touch(path)  # the rescan (or a late close event) while it is in flight
    assert len(tracker) == 0 and tracker.scan(10) == ([], [])
    tracker.release([path])  # recorded: tracked again (the state then skips it unless it changed)
    assert len(tracker) == 1
    tracker.done(path, hold=True)
    tracker.release([path])  # nothing happened meanwhile: not tracked again
    assert len(tracker) == 0 and tracker.holding() == 0


def test_a_state_file_failure_after_the_results_are_written_does_not_answer_twice(tmp_path: Path) -> None:
    root = _folder(tmp_path, 20)
    lines: list[str] = []
    watcher = Watcher(WatchOptions(folder=root, once=True), _params(), FakeScorer(), say=lines.append)
    record = watcher.state.record
    calls = {"n": 0}

    def flaky(done: Any, offsets: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # the first batch's commit (after results.append): a disk I/O error
            raise sqlite3.OperationalError("disk I/O error")
        record(done, offsets)

    watcher.state.record = flaky  # type: ignore[method-assign]
    _run_once(watcher)
    rows = Counter(r["relpath"] for r in _jsonl(default_out(root)))
    assert len(rows) == 20 and set(rows.values()) == {1}
    assert sum("state file failed (OperationalError: disk I/O error)" in line for line in lines) == 1
    state = WatchState(default_out(root) / WatchParams().state_file)
    assert state.count("classified") == 20  # the refused batch went with a later commit
    assert state.offset("jsonl_offset") == (default_out(root) / "results.jsonl").stat().st_size
    state.close()


def test_the_settler_survives_an_error_and_says_it_once(tmp_path: Path) -> None:
    root = _folder(tmp_path, 10)
    lines: list[str] = []
    watcher = Watcher(WatchOptions(folder=root, once=True), _params(rescan_s=60.0), FakeScorer(), say=lines.append)
    seen = watcher.state.seen_unchanged
    calls = {"n": 0}

    def flaky(path: str, st: os.stat_result) -> bool:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise sqlite3.OperationalError("database is locked")
        return seen(path, st)

    watcher.state.seen_unchanged = flaky  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("emassist.pipeline.watch.SETTLE_RETRY_S", 0.05, raising=False)
        _run_once(watcher)  # before the guard: the settler died and --once never finished
    rows = Counter(r["relpath"] for r in _jsonl(default_out(root)))
    assert len(rows) == 10 and set(rows.values()) == {1}
    errors = [line for line in lines if line.startswith("error: the settler failed")]
    assert len(errors) == 1 and "database is locked" in errors[0]


def test_the_csv_is_not_doubled_when_killed_before_the_first_commit(tmp_path: Path) -> None:
    state = WatchState(tmp_path / "state.db")
    results = Results(tmp_path, ["Fibres"])
    results.recover(state)
    results.append([_record("a.png"), _record("b.png")])  # written; killed before the first state commit
    results.close()
    again = Results(tmp_path, ["Fibres"])
    assert again.recover(state) == 2
    again.close()
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("time,path,status") and [x.split(",")[1] for x in csv_lines[1:]] == [
        "/x/a.png", "/x/b.png"]  # fmt: skip
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert state.offset("csv_offset") == (tmp_path / "results.csv").stat().st_size
    state.close()


def test_an_inotify_overflow_asks_for_a_rescan() -> None:
    import logging

    from emassist.pipeline.watch import _OverflowWatch

    flag = threading.Event()
    _OverflowWatch.install(flag)
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
    assert flag.is_set()


# ------------------------------------------------------------------------------------------------ the Live tab's hub


def test_the_live_stream_resumes_after_its_own_ids_and_restarts_after_another_servers() -> None:
    from serving.webapp.app import LiveHub

    hub = LiveHub()
    for i in range(3):
        hub.publish({"relpath": f"f{i}.png", "status": "classified"}, None)
    last = hub.event_id(2)
    assert [e["relpath"] for e in hub.since(hub.resume_after(last))] == ["f2.png"]  # a reconnect: what it missed
    assert hub.resume_after(None) == 0 and hub.resume_after("garbage") == 0
    restarted = LiveHub()  # a new server process: a browser comes back with the old server's id
    restarted.publish({"relpath": "new.png", "status": "classified"}, None)
    assert restarted.epoch != hub.epoch
    for stale in (last, hub.event_id(99), "2"):  # the old server's ids, and the old plain-number form
        assert [e["relpath"] for e in restarted.since(restarted.resume_after(stale))] == ["new.png"]
    assert restarted.resume_after(f"{restarted.epoch}-7") == 0  # beyond this hub's numbers: from the start


def test_the_web_page_closes_the_watchers_log_writer_only_after_the_watcher_ended() -> None:
    from serving.webapp.app import _stop_watch

    class Writer:
        closed = False

        def close(self) -> None:
            self.closed = True

    release = threading.Event()
    busy = threading.Thread(target=release.wait, daemon=True)  # the watcher still finishing a batch
    busy.start()
    writer = Writer()
    watcher = SimpleNamespace(stop=lambda: None)
    assert _stop_watch(watcher, busy, writer, timeout_s=0.05) is False  # type: ignore[arg-type]
    assert not writer.closed  # its sink may still log
    release.set()
    busy.join(5)
    assert _stop_watch(watcher, busy, writer, timeout_s=1.0) is True  # type: ignore[arg-type]
    assert writer.closed
