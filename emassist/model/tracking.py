"""MLflow bookkeeping of the stages: tracking setup, run tags (git commit, data version, the process that owns the
run), flat params, and the end of a run a process does not finish (a signal, or a process that is gone).

A run started by a stage is tagged ``emassist.stage`` (e.g. ``train``), ``emassist.host`` and ``emassist.pid``
(:func:`process_tags`). :func:`end_run_on_signal` marks the active run ``KILLED`` on SIGTERM/SIGINT, and
:func:`close_orphaned_runs` marks ``FAILED`` the ``RUNNING`` runs of a stage whose process is gone (SIGKILL, a
crashed machine), so no run stays ``RUNNING`` forever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import yaml

from emassist.config.settings import Params

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
ARTIFACT_DIR = Path("mlartifacts")
STAGE_TAG = "emassist.stage"
HOST_TAG = "emassist.host"
PID_TAG = "emassist.pid"
CLOSED_TAG = "emassist.closed"  # why a run was ended by someone else than its own process


def setup_mlflow(params: Params) -> str:
    """Point MLflow at the tracking URI (env ``MLFLOW_TRACKING_URI`` wins) and select the experiment."""
    import mlflow  # lazy: importing MLflow takes seconds

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = params.mlflow.resolved_tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = params.mlflow.experiment
    if mlflow.get_experiment_by_name(name) is None:
        # A local store keeps artifacts beside the database; a server decides for itself.
        location = ARTIFACT_DIR.resolve().as_uri() if uri.startswith(("sqlite:", "file:")) else None
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return uri


def tracking_client(params: Params) -> MlflowClient:
    """An MlflowClient on the configured tracking URI (env ``MLFLOW_TRACKING_URI`` wins), which also becomes MLflow's
    current one (for ``models:/`` URIs); unlike :func:`setup_mlflow` it selects and creates no experiment."""
    import mlflow  # lazy: importing MLflow takes seconds

    mlflow.set_tracking_uri(params.mlflow.resolved_tracking_uri())
    return mlflow.MlflowClient()


def flat_params(params: Params, sections: tuple[str, ...] = ("data", "ingest", "split", "augment", "train")) -> dict:
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list | tuple) and prefix.endswith("classes"):
            out[prefix] = ",".join(map(str, value))
        else:
            out[prefix] = value

    for section in sections:
        walk(section, dataclasses.asdict(getattr(params, section)))
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}{'-dirty' if dirty else ''}"


def data_version(splits_dir: Path, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """The DVC hash of the splits folder (from dvc.lock) and our own hash of the split files' bytes."""
    tags: dict[str, str] = {}
    if lock_file.is_file():
        lock = yaml.safe_load(lock_file.read_text()) or {}
        for out in (lock.get("stages", {}).get("split", {}) or {}).get("outs", []) or []:
            if Path(out.get("path", "")) == splits_dir:
                tags["data_version"] = str(out.get("md5", ""))
    digest = hashlib.md5(usedforsecurity=False)
    for name in ("train.csv", "val.csv", "test.csv"):
        path = splits_dir / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    tags["splits_md5"] = digest.hexdigest()
    tags.setdefault("data_version", tags["splits_md5"])
    return tags


def run_tags(params: Params) -> dict[str, str]:
    """Tags of a training run: code and data versions, the Prefect flow run, and why it was retrained (every
    ``EMASSIST_RETRAIN_X`` environment variable, set by the retraining flow, becomes tag ``retrain_x``)."""
    tags = {"git_commit": git_commit(), "model": params.train.model, "data_source": params.data.source}
    tags.update(data_version(Path(params.data.splits_dir)))
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        tags["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    for key, value in os.environ.items():
        if key.startswith("EMASSIST_RETRAIN_") and value:
            tags["retrain_" + key.removeprefix("EMASSIST_RETRAIN_").lower()] = value[:5000]  # MLflow: 8,000 max
    return tags


# ------------------------------------------------------------------------------------------- runs that do not finish


def process_tags(stage: str) -> dict[str, str]:
    """Tags naming the stage and the process (host, pid) that owns a run: what :func:`close_orphaned_runs` reads."""
    return {STAGE_TAG: stage, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def close_orphaned_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark ``FAILED`` the ``RUNNING`` runs of ``stage`` in the experiment whose process is gone; their ids.

    Only runs tagged by :func:`process_tags` with this machine's host name and the pid of a process that no longer
    exists are touched: a run of another machine (whose process cannot be seen from here), of a live process, or
    without the tags (not started by the stage) is left as it is.
    """
    from mlflow import MlflowClient  # lazy: importing MLflow takes seconds

    client = MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{STAGE_TAG}` = '{stage}'"
    )
    closed: list[str] = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if tags.get(HOST_TAG) != host or pid == os.getpid() or _process_alive(pid):
            continue
        client.set_tag(run.info.run_id, CLOSED_TAG, f"orphaned: process {pid} on {host} was gone")
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("MLflow run %s (%s, pid %d) was left RUNNING by a process that is gone: marked FAILED",
                    run.info.run_id, stage, pid)  # fmt: skip
        closed.append(run.info.run_id)
    return closed


class _Stopped(BaseException):
    """Raised by :func:`end_run_on_signal`'s handler to unwind the main thread (a BaseException: ``except Exception``
    blocks on the way do not swallow it)."""

    def __init__(self, signum: int, frame: FrameType | None, run_id: str | None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.frame, self.run_id = signum, frame, run_id


RESEND_INTERVAL_S = 3.0  # how often a stop that has not reached end_run_on_signal yet is raised again


@contextmanager
def end_run_on_signal(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT), resend_interval_s: float = RESEND_INTERVAL_S
) -> Iterator[None]:
    """While inside, SIGTERM / SIGINT first end the active MLflow run as ``KILLED``, then act as before.

    The handler itself touches no store: it notes the active run and raises, so that whatever the main thread was
    doing unwinds first (a metric write interrupted halfway rolls back and lets go of the SQLite lock, which a write
    from inside the handler would wait on for ever: "database is locked"). Once unwound to here, the run is marked
    ``KILLED`` and the previous handler runs (SIGINT: ``KeyboardInterrupt``); a signal that had the default action is
    raised again with it, so the process still ends with the usual signal status.

    An exception raised in a signal handler can be lost: Python swallows it ("Exception ignored in") when the
    handler happened to run inside a ``__del__`` or a weakref callback, which TensorFlow's objects run at any moment,
    and some libraries catch everything. So until the stop has unwound to here, a watcher thread raises it again
    every ``resend_interval_s``: the same signal, sent to the main thread (so a blocking call there is woken as by the
    first), and the same handler, which tells it from another signal by a flag. A second signal from outside
    meanwhile acts as before (e.g. a second Ctrl-C). Signal handlers can only be set in the main thread: elsewhere
    (e.g. a Prefect task thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main = threading.main_thread().ident or 0
    previous: dict[int, Any] = {}
    stopping: dict[str, Any] = {}  # the first signal's: signum, run_id; "resend": a raise of ours is on its way
    requested = threading.Event()  # a signal came: the watcher starts watching
    arrived = threading.Event()  # the stop reached the except below (or the body ended): the watcher ends
    lock = threading.RLock()  # re-entrant: the handler runs in the main thread, which may hold it below

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    def finish() -> None:
        """The stop has arrived or the body has ended: the watcher stops, the previous handlers are back."""
        with lock:
            arrived.set()
            restore()
        requested.set()  # wakes an idle watcher, which sees arrived and ends

    def act_as_before(signum: int, frame: FrameType | None) -> None:
        finish()  # first: no stop of the watcher's may follow the previous handler's
        old = previous[signum]
        if callable(old):
            old(signum, frame)
        else:  # SIG_DFL: die of the same signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def handler(signum: int, frame: FrameType | None) -> None:
        import mlflow

        with lock:
            resent, stopping["resend"] = stopping.get("resend", False), False
        if "signum" in stopping and not resent:  # a second signal from outside
            act_as_before(signum, frame)
            return
        if "signum" not in stopping:
            run = mlflow.active_run()  # the fluent API's own state: no store access
            stopping.update(signum=signum, run_id=None if run is None else run.info.run_id)
            requested.set()
        raise _Stopped(stopping["signum"], frame, stopping["run_id"])

    def watch() -> None:  # started before any signal: starting a thread inside the handler could deadlock
        requested.wait()
        while not arrived.wait(resend_interval_s):
            with lock:  # our handler is still in place while arrived is unset (finish() sets it before restoring)
                if arrived.is_set():
                    return
                stopping["resend"] = True
                signal.pthread_kill(main, stopping["signum"])
            log.warning("signal %s: the stop has not unwound the main thread in %g s (lost inside a __del__?): "
                        "raised again", signal.Signals(stopping["signum"]).name, resend_interval_s)  # fmt: skip

    for sig in signals:
        current = signal.getsignal(sig)
        if current in (signal.SIG_IGN, None):  # ignored (or set outside Python): leave it so
            continue
        previous[sig] = current
        signal.signal(sig, handler)
    threading.Thread(target=watch, name="end-run-on-signal", daemon=True).start()
    try:
        yield
    except _Stopped as stop:
        finish()
        _mark_killed(stop.run_id, stop.signum)
        act_as_before(stop.signum, stop.frame)
        raise
    else:
        finish()
        if "signum" in stopping:  # the stop was lost and the body ended before it was raised again: act on it now
            act_as_before(stopping["signum"], None)
    finally:
        finish()  # another exception (or a second time: harmless)


def _mark_killed(run_id: str | None, signum: int) -> None:
    """End run ``run_id`` as ``KILLED`` (the ``with mlflow.start_run()`` it was in may have closed it as FAILED while
    the signal's exception passed through)."""
    import mlflow

    if run_id is None:
        return
    log.warning("signal %s: MLflow run %s marked KILLED", signal.Signals(signum).name, run_id)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status="KILLED")
    else:
        mlflow.MlflowClient().set_terminated(run_id, status="KILLED")
