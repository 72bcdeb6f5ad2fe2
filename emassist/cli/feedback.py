"""``emassist correct`` and ``emassist feedback list|resolve|commit``: a microscopist's corrections as training data.

Wired into ``emassist.cli.main`` with ``add_commands(sub)``. Exit codes: 0 done (a repeat and a conflict included:
both are recorded states, said on stdout), 1 the image or the store cannot be found or used, 2 a bad argument (an
unknown class, an ambiguous prefix).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from emassist.config.settings import Params, load_params
from emassist.data.feedback import (
    CONFLICT_DIR,
    FeedbackError,
    check_class,
    correct,
    find_corrected,
    resolve,
    sha256_of,
    stored_files,
    summarize,
)
from emassist.data.predlog import PredictionLog, PredictionLogError, safe_url

_HEX = set("0123456789abcdef")
MIN_PREFIX = 6  # shorter hex keys are too likely to match several images


class _Usage(Exception):
    """A bad argument: exit 2."""


def _store(params: Params) -> PredictionLog:
    return PredictionLog(params.monitoring.resolved_db_uri())


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _one(matches: list[str], key: str, what: str) -> str:
    if len(matches) > 1:
        shown = ", ".join(m[:16] for m in matches[:5]) + (" …" if len(matches) > 5 else "")
        raise _Usage(f"{key!r} matches {len(matches)} {what}: {shown}; give more characters of the sha256")
    return matches[0]


def _is_hex(key: str) -> bool:
    return len(key) >= MIN_PREFIX and set(key.lower()) <= _HEX


def locate(store: PredictionLog, key: str, feedback_dir: Path) -> tuple[str, bytes | None, str, Any]:
    """(sha256, the image's bytes or None, where they came from, the newest logged prediction or None) for ``key``:
    an existing file, a (prefix of a) sha256 in the log or among the corrections, or a path the log names as
    ``origin`` (``emassist predict``'s path, the page's upload name)."""
    path = Path(key).expanduser()
    if path.is_file():
        data = path.read_bytes()
        sha = sha256_of(data)
        return sha, data, str(path), _newest_prediction(store, sha)
    if path.exists():
        raise FeedbackError(f"{key} is not a file")
    matches = store.find_sha256(key)
    if not matches and not path.is_absolute():
        matches = store.find_sha256(str(path.resolve()))  # the log may hold the absolute path predict read
    if not matches and _is_hex(key):
        matches = find_corrected(store, key)
    if not matches:
        if _is_hex(key) or len(key) == 64:
            raise FeedbackError(
                f"unknown sha256 {key!r}: no logged prediction or correction starts with it, and "
                "it is no file here; give the image file: emassist correct PATH --label CLASS"
            )
        raise FeedbackError(f"{key}: no such file, and no logged prediction read it")
    sha = _one(matches, key, "images")
    newest = _newest_prediction(store, sha)
    logged = store.predictions(sha256=sha)
    paths = logged[logged["source"] != "web"] if len(logged) else logged  # the page logs an upload's name, no path
    origins = list(dict.fromkeys(str(o) for o in paths["origin"][::-1])) if len(paths) else []
    for origin in origins:
        candidate = Path(str(origin))
        if origin and candidate.is_file():
            data = candidate.read_bytes()
            if sha256_of(data) == sha:
                return sha, data, str(candidate), newest
    if stored_files(feedback_dir, sha):
        return sha, None, "the stored copy", newest
    gone = [str(o) for o in origins if o and not Path(str(o)).is_file()]
    if gone:
        raise FeedbackError(f"{sha[:12]} was read from {gone[0]}, which is gone (or changed since): give the image "
                            "file itself: emassist correct PATH --label CLASS")  # fmt: skip
    raise FeedbackError(f"{sha[:12]} was logged but its bytes are not here (an upload to the page?): correct it on "
                        "the page, or give the file: emassist correct PATH --label CLASS")  # fmt: skip


def _newest_prediction(store: PredictionLog, sha: str) -> Any:
    rows = store.predictions(sha256=sha)
    return rows.iloc[-1] if len(rows) else None


def _cmd_correct(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    classes = params.data.classes
    try:
        check_class(args.label, classes)
    except FeedbackError as exc:
        return _fail(f"--label: {exc}", 2)
    store = _store(params)
    feedback_dir = Path(params.monitoring.feedback_dir)
    try:
        sha, data, where, newest = locate(store, args.image, feedback_dir)
        result = correct(
            store, sha, args.label, classes=classes, feedback_dir=feedback_dir, who=args.who, image_bytes=data,
            ext=Path(where).suffix if data is not None else None,
            model_version="" if newest is None else str(newest["model_version"]),
            old_label="" if newest is None else str(newest["label"]),
        )  # fmt: skip
    except _Usage as exc:
        return _fail(str(exc), 2)
    except (FeedbackError, PredictionLogError) as exc:
        return _fail(str(exc))
    if newest is None and result.status == "stored":
        print(f"note: {sha[:12]} was never logged as a prediction; stored without the model's label")
    print(result.message())
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    store = _store(params)
    try:
        images = summarize(store, params.monitoring.feedback_dir)
    except PredictionLogError as exc:
        return _fail(str(exc))
    if args.conflicts:
        images = [i for i in images if i.status == "conflicting"]
    if not images:
        print(f"no {'conflicting ' if args.conflicts else ''}corrections in {safe_url(store.db_uri)}")
        return 0
    n_conflicts = sum(i.status == "conflicting" for i in images)
    print(f"{len(images)} corrected images ({n_conflicts} conflicting) in {safe_url(store.db_uri)}")
    print(f"  {'sha256':<14}{'status':<13}{'label':<22}{'labels given':<34}{'who':<20}{'last':<17}file")
    for i in images:
        when = i.last.strftime("%Y-%m-%d %H:%M") if hasattr(i.last, "strftime") else str(i.last)
        print(f"  {i.sha256[:12]:<14}{i.status:<13}{i.label or '-':<22}{', '.join(i.labels):<34}"
              f"{', '.join(i.who)[:19] or '-':<20}{when:<17}{i.path or '(missing here)'}")  # fmt: skip
    if n_conflicts:
        print("conflicting images are left out of training: emassist feedback resolve SHA --label CLASS")
    return 0


def _cmd_resolve(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    classes = params.data.classes
    try:
        check_class(args.label, classes)
    except FeedbackError as exc:
        return _fail(f"--label: {exc}", 2)
    store = _store(params)
    try:
        matches = find_corrected(store, args.sha256) if _is_hex(args.sha256) else []
        if not matches:
            return _fail(f"no corrected image's sha256 starts with {args.sha256!r} (at least {MIN_PREFIX} hex "
                         "digits; see `emassist feedback list`)")  # fmt: skip
        sha = _one(matches, args.sha256, "corrected images")
        result = resolve(store, sha, args.label, classes=classes, feedback_dir=params.monitoring.feedback_dir,
                         who=args.who)  # fmt: skip
    except _Usage as exc:
        return _fail(str(exc), 2)
    except (FeedbackError, PredictionLogError) as exc:
        return _fail(str(exc))
    print(result.message())
    return 0


def _dvc(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *argv], capture_output=True, text=True)


def _cmd_commit(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    root = Path(params.monitoring.feedback_dir)
    if not root.is_dir():
        print(f"nothing to commit: {root} does not exist (no corrections yet)")
        return 0
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    tracked = {p.with_suffix("").name for p in root.glob("*.dvc")}
    targets = [p for p in folders if any(p.iterdir()) or p.name in tracked or p.name == CONFLICT_DIR]
    if not targets:
        print(f"nothing to commit: no corrected images in {root}")
        return 0
    added = _dvc("add", *(str(p) for p in targets))
    if added.returncode != 0:
        return _fail(f"dvc add failed: {(added.stderr or added.stdout).strip()[-800:]} (is this a DVC repository? "
                     "run it at the repository root)")  # fmt: skip
    counts = ", ".join(f"{p.name} {sum(1 for f in p.iterdir() if f.is_file())}" for p in targets)
    print(f"dvc add: {len(targets)} folders of {root} ({counts})")
    dvc_files = [f"{p}.dvc" for p in targets]
    remote = _dvc("remote", "default")
    name = remote.stdout.strip() if remote.returncode == 0 else ""
    if args.no_push:
        print("not pushed (--no-push)")
    elif not name:
        print("no default DVC remote configured: `dvc add` only, nothing pushed (set one: dvc remote add -d NAME URL)")
    else:
        pushed = _dvc("push", "-r", name, *dvc_files)
        if pushed.returncode != 0:
            return _fail(f"dvc push to remote {name!r} failed: {(pushed.stderr or pushed.stdout).strip()[-800:]}")
        print(f"dvc push: sent to remote {name!r}")
    print(f"next: git add {' '.join(dvc_files)} {root / '.gitignore'} && git commit -m 'corrections'")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``correct`` and ``feedback list|resolve|commit``."""
    p = sub.add_parser(
        "correct",
        help="say a prediction was wrong: store the image under its right class as training data",
        description="Store the image's original bytes once at <monitoring.feedback_dir>/<Class>/<sha256>.<ext> and "
        "log the correction (who, when, model version, old and new label). The same correction twice adds nothing; "
        "a correction that contradicts an earlier one marks the image conflicting (left out of training until "
        "`emassist feedback resolve`). The next `dvc repro` merges the folder into the training data.",
        epilog="SHA256|PATH: a file (its sha256 computed from its bytes, as ingest does), the sha256 of a logged image "
        f"(a prefix of at least {MIN_PREFIX} hex digits is enough when it is unique), or the path `emassist predict` "
        "read (looked up in the prediction log).",
    )
    p.add_argument("image", metavar="SHA256|PATH", help="the image: a file, a sha256 (or unique prefix), a logged path")
    p.add_argument("--label", required=True, metavar="CLASS", help="the right class (one of data.classes)")
    p.add_argument("--who", default="", metavar="NAME", help="who says so (free text, kept in the log)")
    p.set_defaults(func=_cmd_correct)

    fb = sub.add_parser(
        "feedback",
        help="corrected images: list them and their conflicts, resolve a conflict, version them with DVC",
        description="The corrections made with `emassist correct` and the web page.",
    )
    fsub = fb.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    p = fsub.add_parser(
        "list",
        help="corrected images, conflicting ones first",
        description="Every corrected image: status, current label, the labels given, who, when.",
    )
    p.add_argument("--conflicts", action="store_true", help="only the conflicting images")
    p.set_defaults(func=_cmd_list)
    p = fsub.add_parser(
        "resolve",
        help="give a conflicting image its one label",
        description="Record the right label of a corrected image (a conflicting one, usually): its corrections are "
        "marked ok again and the image moves into that class's folder, so the next acquire merges it.",
    )
    p.add_argument("sha256", metavar="SHA", help=f"the image's sha256 (a unique prefix of {MIN_PREFIX}+ hex digits)")
    p.add_argument("--label", required=True, metavar="CLASS", help="the right class (one of data.classes)")
    p.add_argument("--who", default="", metavar="NAME", help="who decided (free text, kept in the log)")
    p.set_defaults(func=_cmd_resolve)
    p = fsub.add_parser(
        "commit",
        help="version the corrected images: dvc add (+ dvc push when a DVC remote is configured)",
        description="Run `dvc add` on each folder of monitoring.feedback_dir, then `dvc push` of them to the default "
        "DVC remote if one is configured (else says so). Commit the .dvc files it names with git afterwards.",
    )
    p.add_argument("--no-push", action="store_true", help="dvc add only, even with a remote configured")
    p.set_defaults(func=_cmd_commit)
