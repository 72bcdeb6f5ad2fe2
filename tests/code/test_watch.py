"""The watcher's parts without a model: the settle rule (a fake clock), ignored names, the catch-up walk over a
link loop, the state file across restarts, results recovery after a hard stop, and the alert's decision."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from emassist.pipeline.watch import default_out
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
