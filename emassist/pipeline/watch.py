"""``emassist watch DIR``: classify images as the microscope writes them into a folder (tree).

Threads, each with one job:

* the **observer** (watchdog: inotify, or ``--poll`` with the polling observer for network shares whose events
  never arrive) turns file-system events into :meth:`Tracker.touch` / ``forget`` calls;
* the **settler** stats the tracked files (:mod:`emassist.pipeline.watch_files`: complete = unchanged for
  ``watch.settle_s``), skips what the state file has already answered, reads + hashes + decodes the ripe ones
  with the served model's preprocessing (:class:`~emassist.pipeline.watch_scorer.Scorer`) and puts them on a
  bounded queue (``watch.queue_size``: a burst of 10,000 files waits as paths, not as images);
* the **sink** takes up to ``watch.batch_size`` images (waiting at most ``watch.max_wait_s`` for a partial batch),
  answers them in one forward pass, and for each: ``--sort`` copy, results.jsonl/csv (fsynced), the state file,
  the prediction log (source ``watch``), ``--alert``, the listeners (the web page's Live tab), a line;
* the **supervisor** (:meth:`Watcher.run`'s loop) restarts the observer when the folder disappears and comes back,
  and walks the folder again (catch-up) at start, after that, after an inotify queue overflow, and every
  ``watch.rescan_s``.

A file is answered once: from the moment the settler hands it on (queued, or reported as a lapse) until the sink
has recorded its outcome in the state file it is *held* by the tracker, so the rescans and late events of a burst do
not queue it again (an event for a held file re-tracks it after the record: the state then skips it unless it
changed). Rows written to the results but not committed to the state (the state file failed) stay held and are
committed with the next batch, or at the close, or recovered from the results at the next start.

A stop (:meth:`Watcher.stop`: Ctrl-C / SIGTERM in the command) lets the sink finish the batch it holds; files
still queued are not recorded, so the next start answers them (nothing lost, nothing twice). Neither the settler
nor the sink dies of an error: it costs a line (once per kind for the settler) and the files are tried again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emassist.config.settings import Params, WatchParams
from emassist.data.hashing import file_sha256
from emassist.data.predlog import LogWriter
from emassist.model.scale import ScaleUsed
from emassist.pipeline.watch_files import Lapse, Ripe, Tracker, ignore_rule, still_writing, walk_files
from emassist.pipeline.watch_outputs import REJECTED_DIR, Alerter, Results, done_of, sort_copy
from emassist.pipeline.watch_scorer import Scorer, scale_fields
from emassist.pipeline.watch_state import Done, WatchState, stat_sig
from emassist.serve.backend import BackendError
from emassist.serve.predlog_hooks import prediction_row

log = logging.getLogger("emassist.watch")

RETRY_S = 2.0  # an endpoint that cannot answer: the batch is tried again after this
RATE_WINDOW_S = 10.0  # the progress line's rate: answers over the last this many seconds
SETTLE_RETRY_S = 1.0  # the settler failed (e.g. the state file): its files are tried again after this

Listener = Callable[[dict[str, Any], "np.ndarray | None"], None]


def _pixel_note(record: dict[str, Any]) -> str:
    """A scale-aware model's line: the pixel size its answer used and where it came from."""
    nm = record.get("pixel_size_nm")
    if nm is None:
        return "  (pixel size unknown)"
    return f"  ({nm:.4g} nm/px from {record.get('pixel_size_source')})"


def default_out(folder: Path) -> Path:
    """Results beside the watched folder (never inside it): ``<folder>-emassist/``."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f"{folder.name}-emassist")


@dataclass
class WatchOptions:
    """What one watcher does (the command's options; knobs from ``params.watch``)."""

    folder: Path
    out: Path | None = None  # None: default_out(folder)
    poll: bool = False
    alert: Sequence[str] = ()
    min_confidence: float | None = None  # None: watch.min_confidence
    alert_url: str | None = None
    sort: bool = False
    log_predictions: bool = True
    once: bool = False  # catch up, answer everything that is complete, then stop

    def resolved_out(self) -> Path:
        return Path(os.path.abspath(self.out)) if self.out is not None else default_out(self.folder)


@dataclass
class Item:
    """A file on its way from the settler to the sink."""

    relpath: str
    path: Path
    status: str  # ready (an image to answer) | rejected | incomplete | unreadable
    sig: str
    ready_at: float  # monotonic: when it was found complete (the latency's start)
    sha256: str = ""
    reason: str = ""
    image: np.ndarray | None = None
    facts: Any = None
    scale: ScaleUsed | None = None  # the pixel size a scale-aware model gets (tags, data bar, else unknown)


@dataclass
class Stats:
    seen: int = 0
    classified: int = 0
    rejected: int = 0
    incomplete: int = 0
    gone: int = 0
    skipped: int = 0  # files already answered before (the state file), each counted once however often rescanned
    alerts: int = 0
    queued: int = 0
    waiting: int = 0
    rate: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))


class Watcher:
    """One watched folder, one model; :meth:`run` blocks until :meth:`stop` (or, with ``once``, until idle)."""

    def __init__(
        self,
        options: WatchOptions,
        params: Params,
        scorer: Scorer,
        *,
        log_writer: LogWriter | None = None,
        say: Callable[[str], None] | None = None,
        listeners: Sequence[Listener] = (),
    ) -> None:
        self.options = options
        self.params = params
        self.cfg: WatchParams = params.watch
        self.ignored = ignore_rule(self.cfg)
        self.scorer = scorer
        self.root = Path(os.path.abspath(options.folder))
        self.out = options.resolved_out()
        inside = self.out == self.root or self.root in self.out.parents
        self.skip = self.out if inside else None
        self.say = say or (lambda line: print(line, flush=True))
        self.listeners = list(listeners)
        self.log_writer = log_writer
        self.tracker = Tracker(self.cfg.settle_s, self.cfg.incomplete_timeout_s)
        self.queue: queue.Queue[Item] = queue.Queue(maxsize=self.cfg.queue_size)
        self.stats = Stats()
        self.state = WatchState(self.out / self.cfg.state_file)
        self.scale_aware = bool(getattr(scorer, "scale_aware", False))  # the records say the pixel size used
        self.results = Results(self.out, scorer.classes, scale=self.scale_aware)
        min_conf = options.min_confidence if options.min_confidence is not None else self.cfg.min_confidence
        self.alerter = Alerter(options.alert, min_conf, url=options.alert_url, timeout_s=self.cfg.alert_timeout_s,
                               on_error=lambda m: self.say(f"warning: {m}"))  # fmt: skip
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._answers: deque[float] = deque()
        self._busy = 0  # items taken by the sink and not yet written
        self._busy_lock = threading.Lock()
        self._settling = False  # the settler holds files taken from the tracker and not yet queued
        self._uncommitted: list[tuple[Item, Done]] = []  # written to the results, not yet to the state (sink only)
        self._complained: set[tuple[str, str]] = set()  # (where, exception type) already said
        self._known: set[str] = set()  # relpaths answered by this run or counted as skipped: a rescan finds them
        self._observer: Any = None
        self._threads: list[threading.Thread] = []
        self.started = False

    # ------------------------------------------------------------------------------------------------ control

    def start(self) -> None:
        """Recover the results after a hard stop, catch up, start the observer and the worker threads."""
        if not self.root.is_dir():
            raise OSError(f"{self.root}: not a folder")
        recovered = self.results.recover(self.state)
        if recovered:
            self.say(f"recovered {recovered} answers written before the last stop")
        _OverflowWatch.install(self._rescan)
        self._start_observer()
        for target, name in ((self._settle_loop, "watch-settle"), (self._sink_loop, "watch-sink")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._catch_up()
        self.started = True

    def stop(self) -> None:
        """Ask for a clean stop: the batch in hand is finished; what is still queued is left for the next start."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, tick: Callable[[Stats], None] | None = None, tick_s: float = 0.5) -> Stats:
        """Start (unless started), supervise until stopped (``once``: until nothing is left), then close."""
        if not self.started:
            self.start()
        last_scan = time.monotonic()
        missing = False
        try:
            while not self._stop.wait(tick_s if not self.options.once else 0.05):
                self._update_stats()
                if tick is not None:
                    tick(self.stats)
                present = self.root.is_dir()
                if not present and not missing:
                    missing = True
                    self._stop_observer()
                    self.say(f"warning: {self.root} is gone; waiting for it to come back")
                elif present and missing:
                    missing = False
                    self.say(f"{self.root} is back: watching it again and catching up")
                    self._start_observer()
                    self._catch_up()
                    last_scan = time.monotonic()
                elif present and (self._rescan.is_set() or time.monotonic() - last_scan > self.cfg.rescan_s):
                    self._rescan.clear()
                    self._catch_up()
                    last_scan = time.monotonic()
                if self.options.once and self._idle():
                    break
        finally:
            self.close()
        return self.stats

    def _idle(self) -> bool:
        with self._busy_lock:
            busy = self._busy
        return len(self.tracker) == 0 and self.queue.empty() and busy == 0 and not self._settling

    def close(self) -> None:
        """Stop the observer and the threads (the sink finishes its batch), then close the files."""
        self._stop.set()
        self._stop_observer()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self._uncommitted:  # the last commit failed: once more, else the next start recovers them
            try:
                self.state.record([d for _, d in self._uncommitted], self.results.offsets())
                self._uncommitted.clear()
            except Exception as exc:
                self.say(f"warning: the state file could not record the last {len(self._uncommitted)} answers "
                         f"({type(exc).__name__}: {exc}); the next start recovers them from the results")  # fmt: skip
        self.alerter.close()
        self.results.close()
        self.state.close()
        self._update_stats()

    # ------------------------------------------------------------------------------------------------ observer

    def _start_observer(self) -> None:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        observer = PollingObserver(timeout=self.cfg.poll_interval_s) if self.options.poll else Observer()
        observer.daemon = True
        try:
            observer.schedule(_Handler(self), str(self.root), recursive=True)
            observer.start()
        except OSError as exc:  # e.g. inotify watch limit reached: the rescans still find the files
            self.say(f"warning: cannot watch {self.root} for events ({exc}); finding files by rescans only")
            return
        self._observer = observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        try:
            observer.stop()
            observer.join(5)
        except Exception:  # an emitter whose folder vanished may fail on its way out
            log.debug("observer stop", exc_info=True)

    def wanted(self, path: Path) -> bool:
        """Whether an event's path is a file of ours to classify (not ignored, not under the results)."""
        if self.ignored(path.name):
            return False
        if self.skip is not None and (path == self.skip or self.skip in path.parents):
            return False
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        return not any(self.ignored(part) for part in rel.parts[:-1])

    def touch(self, path: Path) -> None:
        if self.wanted(path):
            self.tracker.touch(path)

    def touch_tree(self, folder: Path) -> None:
        """A folder appeared (created or moved in): everything inside it."""
        if self.wanted(folder) or folder == self.root:
            for path in walk_files(folder, self.skip, self.ignored):
                self.touch(path)

    def forget(self, path: Path) -> None:
        if self.tracker.forget(path):
            self._lapse(Lapse(path, "gone", "deleted before it was read"))

    def _catch_up(self) -> None:
        """Walk the folder: every file not answered yet is tracked (the state file skips the rest unread)."""
        for path in walk_files(self.root, self.skip, self.ignored):
            if self._stop.is_set():
                return
            self.touch(path)

    # ------------------------------------------------------------------------------------------------ settler

    def _settle_loop(self) -> None:
        tick = min(0.25, max(0.02, self.cfg.settle_s / 4))
        limit = max(1, self.cfg.batch_size)
        while not self._stop.is_set():
            ripe: list[Ripe] = []
            failed = False
            self._settling = True
            try:
                ripe, lapses = self.tracker.scan(limit)
                for k, lapse in enumerate(lapses):
                    try:
                        self._lapse(lapse)
                    except Exception:  # this one and the rest: tracked again (the scan took them out)
                        self.tracker.release([x.path for x in lapses[k:] if x.status != "gone"], retrack=True)
                        raise
                if ripe:
                    self._prepare(ripe)  # files it did not hand on stay tracked: the next round tries them again
            except Exception as exc:  # a bug or a state-file error must cost a line, never the settler
                failed = True
                self._complain("settler", exc, f"files waiting are tried again every {SETTLE_RETRY_S:g} s")
            finally:
                self._settling = False
            if failed:
                self._stop.wait(SETTLE_RETRY_S)
            elif len(ripe) < limit:
                self._stop.wait(tick)

    def _complain(self, where: str, exc: BaseException, then: str) -> None:
        """Say an error once per (where, kind); later ones of the same kind only go to the debug log."""
        kind = (where, type(exc).__name__)
        if kind in self._complained:
            log.debug("watch: %s failed again", where, exc_info=True)
            return
        self._complained.add(kind)
        log.error("watch: %s failed", where, exc_info=True)
        self.say(f"error: the {where} failed ({type(exc).__name__}: {exc}); {then}")

    def _relpath(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _lapse(self, lapse: Lapse) -> None:
        if lapse.status == "gone":
            self.stats.gone += 1
            self.say(f"{lapse.path}: gone before it was read")
            self._notify({"time": _now(), "path": str(lapse.path), "relpath": self._relpath_safe(lapse.path),
                          "status": "gone", "error": lapse.reason}, None)  # fmt: skip
            return
        rel = self._relpath(lapse.path)  # held by the tracker from here until the sink records it
        sig = lapse.sig
        try:
            st = os.lstat(lapse.path) if lapse.status == "unreadable" else os.stat(lapse.path)
        except OSError:
            st = None
        if st is not None:
            if self.state.seen_unchanged(rel, st):  # reported before, unchanged: not said twice across restarts
                self.tracker.release([lapse.path])
                return
            sig = stat_sig(st, with_ctime=lapse.status == "unreadable")
        self._put(Item(rel, lapse.path, lapse.status, sig, time.monotonic(), reason=lapse.reason))

    def _relpath_safe(self, path: Path) -> str:
        try:
            return self._relpath(path)
        except ValueError:
            return str(path)

    def _prepare(self, ripe: Sequence[Ripe]) -> None:
        todo: list[Ripe] = []
        for r in ripe:
            if self.state.seen_unchanged(self._relpath(r.path), r.st):
                self.tracker.done(r.path)
                self._count_skipped(self._relpath(r.path))
            else:
                todo.append(r)
        if not todo:
            return
        prepared = self.scorer.prepare([os.fspath(r.path) for r in todo])
        now = time.monotonic()
        for r, p in zip(todo, prepared, strict=True):
            rel = self._relpath(r.path)
            try:
                after = stat_sig(os.stat(r.path))
            except FileNotFoundError:
                self.tracker.done(r.path)
                self._lapse(Lapse(r.path, "gone", "deleted before it was read"))
                continue
            except OSError:
                after = ""
            if after != r.sig:  # written to while it was read: wait for it to settle again
                continue
            if p.image is None:
                if still_writing(p.error):
                    self.tracker.not_yet(r.path, r.sig, p.error)
                    continue
                unreadable = p.error.startswith("unreadable")
                sig = stat_sig(r.st, with_ctime=True) if unreadable else r.sig
                sha = "" if unreadable else _sha256(r.path)
                item = Item(rel, r.path, "unreadable" if unreadable else "rejected", sig, now, sha, p.error)
                self.tracker.done(r.path, hold=True)  # held until recorded: a rescan meanwhile does not queue it again
                self._put(item)
                continue
            sha = p.facts.sha256 if p.facts is not None else ""
            if sha and self.state.has(rel, sha):  # the same bytes again (touched, copied anew)
                self.state.touch(rel, sha, r.sig)
                self.tracker.done(r.path)
                self._count_skipped(rel)
                continue
            item = Item(rel, r.path, "ready", r.sig, now, sha, image=p.image, facts=p.facts, scale=p.scale)
            self.tracker.done(r.path, hold=True)
            self._put(item)

    def _count_skipped(self, rel: str) -> None:
        if rel not in self._known:  # answered by an earlier run (not found again by a rescan of this one)
            self._known.add(rel)
            self.stats.skipped += 1

    def _put(self, item: Item) -> None:
        """Queue an item; blocks while the queue is full (the burst waits as paths in the tracker)."""
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # ------------------------------------------------------------------------------------------------ sink

    def _sink_loop(self) -> None:
        size, wait = max(1, self.cfg.batch_size), self.cfg.max_wait_s
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            with self._busy_lock:
                self._busy = 1
            deadline = time.monotonic() + wait
            while len(batch) < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self.queue.get(timeout=min(left, 0.02))
                except queue.Empty:
                    if not self._settling and self.queue.empty():
                        break  # nothing on its way: answer now rather than wait for a batch that will not come
                    continue
                batch.append(item)
                with self._busy_lock:
                    self._busy = len(batch)
            try:
                self._answer(batch)
            except Exception as exc:  # a bug must cost a line, never the watcher (the files stay unrecorded)
                log.exception("watch: a batch failed")
                self.say(f"error: a batch of {len(batch)} files failed ({type(exc).__name__}: {exc}); "
                         "they are tried again at the next rescan or start")  # fmt: skip
                written = {id(it) for it, _ in self._uncommitted}
                self.tracker.release([it.path for it in batch if id(it) not in written])
            finally:
                with self._busy_lock:
                    self._busy = 0

    def _answer(self, batch: list[Item]) -> None:
        ready = [it for it in batch if it.status == "ready"]
        while True:
            try:
                frame = self.scorer.answer(ready) if ready else None
                break
            except BackendError as exc:
                self.say(f"warning: {exc}; trying again in {RETRY_S:g} s")
                if self._stop.wait(RETRY_S):
                    return  # stopping: nothing recorded, the next start answers them
        rows = frame.to_dict("records") if frame is not None else []
        answers = dict(zip((id(it) for it in ready), rows, strict=True))
        records: list[dict[str, Any]] = []
        for it in batch:
            record = self._record(it, answers.get(id(it)))
            records.append(record)
        offsets = self.results.append(records)  # an error up to here: nothing recorded, the files tried again
        self._commit(batch, [done_of(r) for r in records], offsets)
        now = time.monotonic()
        for it, record in zip(batch, records, strict=True):
            try:
                self._after(it, record, now)
            except Exception as exc:  # written and recorded: a failing line or alert must not repeat the answer
                self._complain("report of an answer", exc, "the answer itself is in the results")

    def _commit(self, batch: list[Item], done: list[Done], offsets: dict[str, int]) -> None:
        """Record a written batch (and any earlier one the state file refused) in the state; then release the files.

        If the state refuses, the rows stay held (never queued again) and go with the next commit, whose offsets
        cover them; a hard stop before that leaves them after the recorded offset, where the next start recovers
        them from the results."""
        self._uncommitted.extend(zip(batch, done, strict=True))
        try:
            self.state.record([d for _, d in self._uncommitted], offsets)
        except Exception as exc:
            self._complain("state file", exc, "the answers are in the results; they are recorded with the next batch")
            return
        items = [it for it, _ in self._uncommitted]
        self._uncommitted.clear()
        self._known.update(it.relpath for it in items)
        self.tracker.release([it.path for it in items])

    def _record(self, it: Item, row: dict[str, Any] | None) -> dict[str, Any]:
        info = self.scorer.backend.info
        record: dict[str, Any] = {"time": _now(), "path": str(it.path), "relpath": it.relpath, "status": it.status,
                                  "label": "", "confidence": None, "needs_review": None, "review_reason": "",
                                  "unfamiliar": None, "unfamiliar_score": None, "error": it.reason,
                                  "sha256": it.sha256, "sig": it.sig, "model": info.name,
                                  "model_version": info.version, "sorted_to": ""}  # fmt: skip
        if self.scale_aware:  # a file that got no answer used no pixel size: empty
            record.update(pixel_size_nm=None, model_pixel_size_nm=None, pixel_size_source="")
        if row is not None:
            error = str(row.get("error") or "")
            if error:  # refused by the model's side (cannot happen for a prepared image, but never lose it)
                record.update(status="rejected", error=error)
            else:
                checked = self.scorer.familiarity_checked
                record.update(
                    status="classified",
                    label=str(row["label"]),
                    confidence=round(float(row["confidence"]), 6),
                    needs_review=bool(row.get("needs_review", False)),
                    review_reason=str(row.get("review_reason") or ""),
                    unfamiliar=bool(row["unfamiliar"]) if checked and "unfamiliar" in row else None,
                    unfamiliar_score=round(float(row["unfamiliar_score"]), 4)
                    if checked and "unfamiliar_score" in row else None,
                    probabilities={c: round(float(row[c]), 6) for c in self.scorer.classes},
                )  # fmt: skip
                if self.scale_aware:
                    record.update(scale_fields(row))
        elif it.status == "ready":
            record.update(status="rejected", error="no answer")
        if self.options.sort and record["status"] in ("classified", "rejected"):
            folder = record["label"] if record["status"] == "classified" else REJECTED_DIR
            try:
                record["sorted_to"] = str(sort_copy(it.path, self.out, folder, it.relpath))
            except OSError as exc:
                record["sorted_to"] = ""
                record["error"] = (record["error"] + "; " if record["error"] else "") + f"not copied: {exc}"
        return record

    def _after(self, it: Item, record: dict[str, Any], now: float) -> None:
        """Counters, the log, the line, the alert and the listeners of one written record."""
        status = record["status"]
        if status == "classified":
            self.stats.classified += 1
            self.stats.latencies.append(now - it.ready_at)
            self._answers.append(now)
            self._log(it, record)
            line = (f"{record['relpath']}: {record['label']} {record['confidence']:.3f}"
                    + (f"  [check: {record['review_reason']}]" if record["needs_review"] else "")
                    + (_pixel_note(record) if self.scale_aware else ""))  # fmt: skip
        elif status == "incomplete":
            self.stats.incomplete += 1
            line = f"{record['relpath']}: INCOMPLETE {record['error']}"
        else:
            self.stats.rejected += 1
            line = f"{record['relpath']}: REJECTED {record['error']}"
        alerted = self.alerter(record, self.say)
        if alerted:
            self.stats.alerts += 1
            record = {**record, "alert": True}
        if not alerted:
            self.say(line)
        self._notify(record, it.image)

    def _log(self, it: Item, record: dict[str, Any]) -> None:
        if self.log_writer is None or it.facts is None:
            return
        try:
            self.log_writer.record(
                prediction_row(
                    "watch", it.facts, self.scorer.identity,
                    label=record["label"], confidence=record["confidence"],
                    probabilities=record["probabilities"], needs_review=bool(record["needs_review"]),
                    unfamiliar=record["unfamiliar"], unfamiliar_score=record["unfamiliar_score"],
                    origin=record["path"],
                )
            )  # fmt: skip
        except Exception:  # the answer matters more than its log line
            log.exception("prediction log: %s not logged", record["path"])

    def _notify(self, record: dict[str, Any], image: np.ndarray | None) -> None:
        for listener in self.listeners:
            try:
                listener(record, image)
            except Exception:
                log.exception("watch listener failed")

    def _update_stats(self) -> None:
        s = self.stats
        s.seen = self.tracker.seen_total
        s.queued = self.queue.qsize()
        s.waiting = len(self.tracker)
        now = time.monotonic()
        while self._answers and now - self._answers[0] > RATE_WINDOW_S:
            self._answers.popleft()
        span = min(RATE_WINDOW_S, now - self._answers[0]) if self._answers else 0.0
        s.rate = len(self._answers) / span if span > 0.5 else 0.0


def _sha256(path: Path) -> str:
    """The rejected file's sha256 for the listing ("" when it cannot be read)."""
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class _Handler:
    """watchdog events → the watcher (every event kind lands in ``dispatch``)."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: Any) -> None:
        w = self.watcher
        kind = event.event_type
        src = Path(os.fsdecode(event.src_path))
        if kind in ("opened", "closed_no_write"):
            return
        if event.is_directory:
            if kind in ("created", "moved"):
                w.touch_tree(Path(os.fsdecode(event.dest_path)) if kind == "moved" else src)
            return
        if kind == "deleted":
            w.forget(src)
        elif kind == "moved":
            w.tracker.forget(src)  # the old (often temporary) name is no file of ours any more
            w.touch(Path(os.fsdecode(event.dest_path)))
        else:  # created, modified, closed, attrib
            w.touch(src)


class _OverflowWatch(logging.Handler):
    """watchdog says an inotify queue overflow only in its log: that line asks the supervisor for a rescan."""

    _installed: _OverflowWatch | None = None

    def __init__(self, flag: threading.Event) -> None:
        super().__init__(logging.WARNING)
        self.flag = flag

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.flag.set()

    @classmethod
    def install(cls, flag: threading.Event) -> None:
        logger = logging.getLogger("watchdog.observers.inotify_c")
        if cls._installed is not None:
            logger.removeHandler(cls._installed)
        cls._installed = cls(flag)
        logger.addHandler(cls._installed)


def done_rows(state_path: Path) -> list[Done]:
    """Every row of a state file (for tests and the bench)."""
    import sqlite3

    with sqlite3.connect(str(state_path)) as db:
        rows = db.execute("SELECT path, sha256, sig, status, label, at FROM files").fetchall()
    return [Done(*r) for r in rows]
