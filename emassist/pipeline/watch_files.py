"""Which files of the watched folder are complete: the settle rule, what is ignored, and the catch-up walk.

A file is *complete* once its stat signature (size, mtime) has not changed for ``watch.settle_s`` (seen by this
process, or read from an mtime at least that old: a file copied in while the watcher was down is ripe at once) and
it decodes. Instruments write in chunks with pauses, or under a temporary name that is then renamed; names that
look temporary (``IGNORED_SUFFIXES``, hidden names) are never read, and a rename brings the final name in as a new
file. A file that is still growing, empty, or truncated when ``watch.incomplete_timeout_s`` has passed since it was
first seen is reported incomplete (and left alone); if it changes later it is tracked again.

:class:`Tracker` only decides *when*; reading, decoding and classifying are the watcher's
(:mod:`emassist.pipeline.watch`). A file handed on (ripe and queued, or lapsed and reported) stays *held* until the
watcher has recorded its outcome (:meth:`Tracker.release`): a rescan or another event in between must not track it
again, or it would be answered twice; an event that arrives for a held file is remembered and the file is tracked
again once it is released (the state file then skips it unread unless it changed).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emassist.config.settings import WatchParams
from emassist.pipeline.watch_state import stat_sig

#: Names an instrument (or a copy tool) writes before the final name, and hidden ones: ``watch.ignore_suffixes`` /
#: ``watch.ignore_prefixes`` (these are their defaults).
IGNORED_SUFFIXES: tuple[str, ...] = WatchParams().ignore_suffixes
IGNORED_PREFIXES: tuple[str, ...] = WatchParams().ignore_prefixes

#: Decode failures that a file still being written gives: wait for it to change (or time out), do not reject it.
WAITING_REASONS: tuple[str, ...] = ("zero-byte file", "truncated", "corrupt ")


def ignored_name(
    name: str, suffixes: tuple[str, ...] = IGNORED_SUFFIXES, prefixes: tuple[str, ...] = IGNORED_PREFIXES
) -> bool:
    """Hidden or temporary-looking names (never read; their final name arrives by a rename)."""
    lowered = name.lower()
    return lowered.startswith(tuple(p.lower() for p in prefixes)) or lowered.endswith(
        tuple(x.lower() for x in suffixes)
    )


def ignore_rule(watch: WatchParams) -> Callable[[str], bool]:
    """:func:`ignored_name` with the suffixes and prefixes of ``watch``."""
    suffixes, prefixes = tuple(watch.ignore_suffixes), tuple(watch.ignore_prefixes)
    return lambda name: ignored_name(name, suffixes, prefixes)


def still_writing(reason: str) -> bool:
    """Whether a decode failure is what a half-written file gives (empty, truncated, broken data)."""
    return reason.startswith(WAITING_REASONS)


def walk_files(root: Path, skip: Path | None = None, ignored: Callable[[str], bool] = ignored_name) -> Iterator[Path]:
    """Every file under ``root`` (symbolic links to folders are not followed: a link loop ends nothing), leaving
    out ``ignored`` names and the ``skip`` folder (the results, when they lie inside the watched folder)."""
    skip_text = os.fspath(skip) if skip is not None else None

    def on_error(exc: OSError) -> None:  # a folder that vanished or cannot be listed: the rest still counts
        return None

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not ignored(d) and os.path.join(dirpath, d) != skip_text)
        for name in sorted(filenames):
            if not ignored(name):
                yield Path(dirpath) / name


@dataclass
class Entry:
    """A file being watched until it is complete."""

    path: Path
    first_seen: float  # monotonic
    sig: str = ""
    sig_since: float = 0.0  # monotonic time the signature was first seen
    tried: str = ""  # signature of the last decode attempt that said "not yet"
    reason: str = "still being written"


@dataclass(frozen=True)
class Ripe:
    """A file that looks complete: to be read, hashed and decoded now."""

    path: Path
    sig: str
    st: os.stat_result


@dataclass(frozen=True)
class Lapse:
    """What happened to a tracked file instead of ripening: ``gone`` (deleted before it was read), ``incomplete``
    (timed out), ``unreadable`` (its stat fails, e.g. a symbolic link loop) or ``rejected`` (not a regular file)."""

    path: Path
    status: str
    reason: str
    sig: str = ""


@dataclass
class Tracker:
    """Files seen but not yet complete; fed by the file-system events and the catch-up walk (thread-safe)."""

    settle_s: float
    incomplete_timeout_s: float
    clock: Callable[[], float] = time.monotonic  # injectable for tests
    wall: Callable[[], float] = time.time
    entries: dict[str, Entry] = field(default_factory=dict)
    seen_total: int = 0
    #: files handed on and not yet recorded → whether an event arrived for them meanwhile
    held: dict[str, bool] = field(default_factory=dict)
    ever: set[str] = field(default_factory=set)  # every file seen (``seen_total`` counts a rescanned one once)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def touch(self, path: Path) -> None:
        """A file was created, written, closed or moved in: track it (again); a held one once it is released."""
        key = os.fspath(path)
        with self._lock:
            if key in self.held:
                self.held[key] = True
            elif key not in self.entries:
                self.entries[key] = Entry(path, self.clock())
                if key not in self.ever:
                    self.ever.add(key)
                    self.seen_total += 1

    def forget(self, path: Path) -> bool:
        """A file was deleted or moved away; True when it was still waiting (deleted before it was read)."""
        with self._lock:
            return self.entries.pop(os.fspath(path), None) is not None

    def not_yet(self, path: Path, sig: str, reason: str) -> None:
        """The decode said "still being written" for this signature: wait for a change (or the timeout)."""
        with self._lock:
            entry = self.entries.get(os.fspath(path))
            if entry is not None:
                entry.tried, entry.reason = sig, reason

    def done(self, path: Path, *, hold: bool = False) -> None:
        """Stop tracking ``path``; ``hold``: it is handed on (queued), so events leave it alone until released."""
        key = os.fspath(path)
        with self._lock:
            self.entries.pop(key, None)
            if hold:
                self.held.setdefault(key, False)

    def release(self, paths: Iterable[Path], *, retrack: bool = False) -> None:
        """Their outcome is recorded (or given up on): those touched while held (all, with ``retrack``) are tracked
        again."""
        now = self.clock()
        with self._lock:
            for path in paths:
                key = os.fspath(path)
                if (self.held.pop(key, False) or retrack) and key not in self.entries:
                    self.entries[key] = Entry(path, now)

    def holding(self) -> int:
        with self._lock:
            return len(self.held)

    def scan(self, limit: int) -> tuple[list[Ripe], list[Lapse]]:
        """Stat every tracked file once: up to ``limit`` ripe ones, and every lapse (removed from tracking; held,
        but for ``gone``, until the watcher releases it)."""
        now = self.clock()
        wall = self.wall()
        ripe: list[Ripe] = []
        lapses: list[Lapse] = []
        with self._lock:
            items = list(self.entries.items())
        for _key, entry in items:
            try:
                st = os.stat(entry.path)
            except FileNotFoundError:
                lapses.append(Lapse(entry.path, "gone", "deleted before it was read"))
                continue
            except OSError as exc:  # ELOOP (a link loop), EACCES on a folder, ...
                lapses.append(Lapse(entry.path, "unreadable", f"unreadable: {exc.strerror or exc}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                if stat.S_ISDIR(st.st_mode):
                    self.done(entry.path)  # a folder: the walk and its own events bring its files
                    continue
                kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
                lapses.append(Lapse(entry.path, "rejected", f"not a regular file ({kind})"))
                continue
            sig = stat_sig(st)
            if sig != entry.sig:
                entry.sig, entry.sig_since = sig, now
            settled = now - entry.sig_since >= self.settle_s or wall - st.st_mtime >= self.settle_s
            if settled and st.st_size > 0 and sig != entry.tried and len(ripe) < limit:
                ripe.append(Ripe(entry.path, sig, st))
            elif now - entry.first_seen > self.incomplete_timeout_s and (not settled or sig == entry.tried
                                                                          or st.st_size == 0):  # fmt: skip
                why = "zero-byte file" if st.st_size == 0 else entry.reason
                lapses.append(Lapse(entry.path, "incomplete",
                                    f"incomplete after {self.incomplete_timeout_s:g} s: {why}", sig))  # fmt: skip
        with self._lock:
            for lapse in lapses:
                key = os.fspath(lapse.path)
                self.entries.pop(key, None)
                if lapse.status != "gone":
                    self.held.setdefault(key, False)
        return ripe, lapses
