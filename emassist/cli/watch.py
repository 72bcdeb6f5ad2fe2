"""``emassist watch DIR``: classify images as the microscope saves them (see :mod:`emassist.pipeline.watch`).

Wired into ``emassist.cli.main`` with ``add_commands(sub)``; the command reads ``args.params`` and returns an exit
code.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from emassist.cli.models import close_prediction_log, open_prediction_log
from emassist.config.settings import load_params

# The model-side modules (MLflow, TensorFlow, watchdog) are imported inside the command: `emassist --help` and the
# other commands should not wait for them.


def _classes(text: str | None) -> list[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def _progress(enabled: bool | None) -> Any:
    """A tqdm status line on stderr (seen / classified / queued / rate); off when stderr is no terminal."""
    from tqdm import tqdm

    return tqdm(total=None, unit="img", desc="watch", bar_format="{desc}: {postfix}", file=sys.stderr,
                disable=None if enabled is None else not enabled, dynamic_ncols=True)  # fmt: skip


def _cmd_watch(args: argparse.Namespace) -> int:
    from emassist.model.tracking import tracking_client
    from emassist.pipeline.watch import Watcher, WatchOptions
    from emassist.pipeline.watch_scorer import Scorer
    from emassist.serve.backend import BackendError, load_backend
    from emassist.serve.predict import training_data_lines

    params = load_params(args.params)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"error: {folder}: not a folder (start the watcher on the folder the microscope saves into)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        print(f"error: --min-confidence: {args.min_confidence} is not between 0 and 1", file=sys.stderr)
        return 2
    if args.alert_url and not args.alert:
        print("error: --alert-url needs --alert CLASS[,CLASS]", file=sys.stderr)
        return 2
    tracking_client(params)  # models:/ URIs resolve against the configured tracking URI
    try:
        backend = load_backend(params, model_uri=args.model, endpoint_url=args.endpoint)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    unknown = [c for c in _classes(args.alert) if c not in backend.classes]
    if unknown:
        print(f"error: --alert: unknown class {', '.join(unknown)} (the model knows: {', '.join(backend.classes)})",
              file=sys.stderr)  # fmt: skip
        return 2
    for line in training_data_lines(backend.config):  # what the model was trained on, before any answer
        print(line, file=sys.stderr)
    options = WatchOptions(folder=folder, out=args.out, poll=args.poll, alert=_classes(args.alert),
                           min_confidence=args.min_confidence, alert_url=args.alert_url, sort=args.sort,
                           once=args.once)  # fmt: skip
    writer = open_prediction_log(params, args)
    bar = _progress(False if args.no_progress else None)

    def say(line: str) -> None:
        bar.write(line, file=sys.stdout) if not bar.disable else print(line, flush=True)

    watcher = Watcher(options, params, Scorer(backend), log_writer=writer, say=say)
    try:
        watcher.start()  # recovery after a hard stop, the observer, the catch-up walk
    except OSError as exc:
        bar.close()
        close_prediction_log(writer)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    mode = f"polling every {params.watch.poll_interval_s:g} s" if args.poll else "file-system events"
    print(f"watching {watcher.root} ({mode}) with {backend.info.label}; results in {watcher.out}", file=sys.stderr)
    if options.alert:
        print(f"alert: {', '.join(options.alert)} at confidence >= {watcher.alerter.min_confidence:g}"
              + (f", POST to {args.alert_url}" if args.alert_url else ""), file=sys.stderr)  # fmt: skip

    def on_signal(signum: int, frame: Any) -> None:
        if watcher.stopping:  # a second Ctrl-C: leave now without waiting for the batch (written answers are kept;
            raise KeyboardInterrupt  # a row cut short is dropped and its file answered at the next start)
        print("\nstopping: finishing the batch in hand (Ctrl-C again to leave at once)", file=sys.stderr)
        watcher.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def tick(stats: Any) -> None:
        queued = stats.queued + stats.waiting
        text = f"seen {stats.seen} · classified {stats.classified} · rejected {stats.rejected} · queued {queued}"
        bar.set_postfix_str(f"{text} · {stats.rate:.1f} img/s", refresh=True)

    at_once = False
    try:
        stats = watcher.run(tick=tick)
    except KeyboardInterrupt:  # the second Ctrl-C / SIGTERM, raised by on_signal while the batch is finished
        at_once, stats = True, watcher.stats
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
        close_prediction_log(writer)
    left = stats.queued + stats.waiting
    print(
        ("left at once" if at_once else "stopped")
        + f": {stats.classified} classified, {stats.rejected} rejected, {stats.incomplete} incomplete, "
        f"{stats.gone} gone before they were read, {stats.skipped} answered before, {stats.alerts} alerts"
        + ("; the batch in hand and what was queued are answered at the next start" if at_once
           else f"; {left} not finished (answered at the next start)" if left else ""),
        file=sys.stderr,
    )  # fmt: skip
    return 130 if at_once else 0


def add_commands(sub: Any) -> None:
    """Add ``watch`` to an ``add_subparsers()`` object."""
    p = sub.add_parser(
        "watch",
        help="watch the microscope's output folder: classify each image as it arrives, alert on a class",
        description=(
            "Watch DIR (and its subfolders) and classify every new image with the champion (or --model, or "
            "--endpoint), through the same preprocessing and answers as `emassist predict` and the web page. A file "
            "is read once it is complete: its size unchanged for watch.settle_s and it decodes; temporary names "
            "(*.tmp, *.part, hidden files) wait for their rename. On start it catches up on files it has not "
            "answered (the state file watch.state_file remembers path + sha256, so nothing is answered twice "
            "across restarts). Results go to OUT/results.jsonl and OUT/results.csv (OUT: --out, default "
            "DIR-emassist beside DIR) and to the prediction log (source 'watch'; --no-log skips it). Files that "
            "are no usable image get a row with the reason ingest gives; a file that never completes is reported "
            "after watch.incomplete_timeout_s. Files in DIR are only ever read. Ctrl-C or SIGTERM finishes the batch "
            "in hand and stops; what was still queued is answered at the next start."
        ),
        epilog=(
            "Examples: emassist watch /data/sem/session-42 --alert Nanowires,Tips --min-confidence 0.9 · "
            "emassist watch /mnt/share/sem --poll --sort --out /data/sorted. Exit codes: 0 stopped cleanly; "
            "1 the model cannot be loaded; 2 bad options; 130 left at once (a second Ctrl-C)."
        ),
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="the folder the microscope saves into (recursively)")
    p.add_argument("--out", type=Path, help="results folder (default: DIR-emassist beside DIR)")
    p.add_argument("--poll", action="store_true",
                   help="list the folder every watch.poll_interval_s instead of file-system events "
                   "(network shares, where inotify events do not arrive)")  # fmt: skip
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, a model folder or a .keras file "
                   "(default: models:/<mlflow.registered_model>@<webapp.alias>, the champion)")  # fmt: skip
    p.add_argument("--endpoint", metavar="URL", help="call this running `mlflow models serve` instead")
    p.add_argument("--alert", metavar="CLASS[,CLASS]", help="classes to alert on, e.g. Nanowires,Tips: a highlighted "
                   "line and the terminal bell (and --alert-url)")  # fmt: skip
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="alert at or above this calibrated confidence (default: watch.min_confidence)")  # fmt: skip
    p.add_argument("--alert-url", metavar="URL", help="also POST each alert as JSON to this URL")
    p.add_argument("--sort", action="store_true",
                   help="copy each image into OUT/<Class>/ (no usable image: OUT/_rejected/)")  # fmt: skip
    p.add_argument("--once", action="store_true",
                   help="catch up on what is in DIR, answer it, and exit (no waiting for new files)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--no-log", action="store_true",
                   help="do not append the answers to the prediction log (monitoring.db_uri)")  # fmt: skip
    p.set_defaults(func=_cmd_watch)
