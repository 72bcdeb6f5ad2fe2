"""Should the model be retrained now, and why: the drift summary and the corrections made since the champion's data.

:func:`retrain_decision` reads the monitoring step's drift summary (``reports/monitoring/drift.json``, written by
:mod:`emassist.pipeline.monitor`), counts the corrections (status ``ok``) logged since the champion's training run
started (its data was taken then; no champion yet: every correction counts) and decides:

* ``drift``: the drift summary says ``"drift"``;
* ``corrections``: at least ``monitoring.retrain_min_corrections`` newly corrected images;
* ``forced``: asked for (the scheduled ``sem-retrain``, ``--force``);
* ``none``: nothing to do, and the reasons say why, with the figures.

:meth:`Decision.environment` is what a retraining passes to the train stage (``EMASSIST_RETRAIN_*``): the MLflow run
it logs gets the tags ``retrain_trigger``, ``retrain_reasons``, ``retrain_base_version``,
``retrain_base_data_version``, ``retrain_new_corrections``, ``retrain_added_images`` and ``retrain_feedback_images``
(:func:`emassist.model.tracking.run_tags`); the last is what the next decision compares its feedback folder with.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emassist.config.settings import Params
from emassist.data.predlog import PredictionLog, PredictionLogError
from emassist.model.tracking import tracking_client

#: The monitoring step's JSON summary (the drift engineer's contract: status, reasons, ...).
DRIFT_FILE = Path("reports/monitoring/drift.json")
DRIFT_STATUSES = ("drift", "no_drift", "not_enough_data")
MISSING = "missing"  # no drift summary at all (the monitoring step has not run)
TRIGGERS = ("drift", "corrections", "forced", "none")
#: Environment variables the train stage copies into run tags (``EMASSIST_RETRAIN_X`` → ``retrain_x``).
ENV_PREFIX = "EMASSIST_RETRAIN_"
#: The run tag of a retraining: images under ``monitoring.feedback_dir`` when it started.
FEEDBACK_TAG = "retrain_feedback_images"
FORCED_REASON = "retraining was asked for (forced: the scheduled sem-retrain, or --force)"


class RetrainError(RuntimeError):
    """The decision cannot be taken (unreadable drift summary, unreachable log store); the message says why."""


@dataclass(frozen=True)
class Champion:
    """The registry's champion as far as retraining cares: which version, on which data, trained when."""

    version: str
    data_version: str | None
    trained_at: datetime  # the training run's start (its data was taken then); else the version's creation
    feedback_images: int | None  # images under monitoring.feedback_dir when it was retrained (None: not recorded)


@dataclass(frozen=True)
class Decision:
    """Whether to retrain, the trigger, and the reasons as sentences with the figures."""

    run: bool
    reasons: list[str]
    trigger: str
    drift_status: str
    n_new_corrections: int
    champion_version: str | None
    champion_data_version: str | None
    threshold: int = 0  # monitoring.retrain_min_corrections
    since: datetime | None = None  # corrections counted after this time (None: all)
    conflicting: int = 0  # corrected images left out (conflicting labels), not counted
    feedback_images: int = 0  # images under monitoring.feedback_dir now
    champion_feedback_images: int | None = None
    drift: Mapping[str, Any] = field(default_factory=dict)

    @property
    def added_images(self) -> int:
        """Images added by corrections since the champion's data: the feedback folder's growth when the champion's
        run recorded its count (a retraining by the flows), else the newly corrected images."""
        if self.champion_feedback_images is not None:
            return max(self.feedback_images - self.champion_feedback_images, 0)
        return self.n_new_corrections

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"] = self.since.isoformat() if self.since else None
        out["drift"] = dict(self.drift)
        out["added_images"] = self.added_images
        return out

    def summary(self) -> str:
        head = f"retrain ({self.trigger})" if self.run else "nothing to do"
        return f"{head}: " + "; ".join(self.reasons)

    def data_diff(self) -> dict[str, Any]:
        """What the retraining adds to the champion's data: keyword arguments of :func:`retrain_environment`."""
        return {
            "base_version": self.champion_version,
            "base_data_version": self.champion_data_version,
            "new_corrections": self.n_new_corrections,
            "added_images": self.added_images,
            "feedback_images": self.feedback_images,
        }

    def environment(self) -> dict[str, str]:
        """The ``EMASSIST_RETRAIN_*`` variables that tag the retraining's MLflow run."""
        return retrain_environment(self.trigger, self.reasons, **self.data_diff())


def retrain_environment(
    trigger: str,
    reasons: Sequence[str],
    *,
    base_version: str | None = None,
    base_data_version: str | None = None,
    new_corrections: int | None = None,
    added_images: int | None = None,
    feedback_images: int | None = None,
) -> dict[str, str]:
    """``EMASSIST_RETRAIN_*`` for a retraining (values left out when unknown)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    values: dict[str, Any] = {
        "TRIGGER": trigger,
        "REASONS": "; ".join(reasons),
        "BASE_VERSION": base_version,
        "BASE_DATA_VERSION": base_data_version,
        "NEW_CORRECTIONS": new_corrections,
        "ADDED_IMAGES": added_images,
        "FEEDBACK_IMAGES": feedback_images,
    }
    return {ENV_PREFIX + k: str(v) for k, v in values.items() if v is not None and v != ""}


@contextlib.contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set ``variables`` in this process's environment for a while (and any other ``EMASSIST_RETRAIN_*`` unset)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    os.environ.update(variables)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------- inputs


def read_drift(path: Path = DRIFT_FILE) -> dict[str, Any]:
    """The drift summary at ``path``; ``{"status": "missing", ...}`` when there is none."""
    if not path.is_file():
        return {"status": MISSING, "reasons": [f"no drift summary at {path}: the monitoring step has not run"]}
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RetrainError(f"drift summary {path} is unreadable ({exc}): run the monitoring step again") from exc
    return check_drift(summary, str(path))


def check_drift(summary: Any, where: str = "drift summary") -> dict[str, Any]:
    """``summary`` if it keeps the contract (a mapping with a known ``status``), else a :class:`RetrainError`."""
    if not isinstance(summary, Mapping):
        raise RetrainError(f"{where}: expected a JSON object, got {type(summary).__name__}")
    status = summary.get("status")
    if status not in (*DRIFT_STATUSES, MISSING):
        raise RetrainError(f"{where}: status must be one of {DRIFT_STATUSES}, got {status!r}")
    reasons = summary.get("reasons") or []
    if isinstance(reasons, str) or not isinstance(reasons, Sequence):
        raise RetrainError(f"{where}: reasons must be a list of sentences, got {reasons!r}")
    return {**summary, "reasons": [str(r) for r in reasons]}


def run_monitoring(params: Params, path: Path = DRIFT_FILE) -> dict[str, Any]:
    """The monitoring step (:func:`emassist.pipeline.monitor.main`) when it is installed, else the last summary it
    wrote (``path``)."""
    try:
        # lazy: the monitoring step imports Evidently and pandas (seconds); the decision alone needs neither.
        # import_module (not `from emassist.pipeline import monitor`) honours a module marked missing.
        monitor = importlib.import_module("emassist.pipeline.monitor")
    except ImportError:
        return read_drift(path)
    return check_drift(monitor.main(params), "the monitoring step's summary")


def _ms(timestamp: int | float | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp / 1000, UTC) if timestamp else None


def find_champion(params: Params) -> Champion | None:
    """The champion of ``mlflow.registered_model`` (None when there is none yet). Other registry errors (an
    unreachable server) are raised: "no champion" would count every correction ever made."""
    from mlflow.exceptions import MlflowException  # lazy: importing MLflow takes seconds

    client = tracking_client(params)
    name = params.mlflow.registered_model
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such model, or no champion alias yet
        raise RetrainError(f"cannot read the champion of {name!r} from MLflow: {exc.message}") from exc
    trained_at = _ms(mv.creation_timestamp) or datetime.now(UTC)
    feedback: int | None = None
    data_version = (mv.tags or {}).get("data_version")
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
        except MlflowException:
            run = None  # the run was deleted: the version's own tags and creation time still tell enough
        if run is not None:
            trained_at = _ms(run.info.start_time) or trained_at
            data_version = data_version or run.data.tags.get("data_version")
            with contextlib.suppress(KeyError, ValueError):
                feedback = int(run.data.tags[FEEDBACK_TAG])
    return Champion(str(mv.version), data_version, trained_at, feedback)


def count_feedback_images(feedback_dir: str | Path) -> int:
    """Image files at ``<feedback_dir>/<Class>/<sha256>.<ext>``."""
    root = Path(feedback_dir)
    return sum(1 for p in root.glob("*/*") if p.is_file()) if root.is_dir() else 0


def new_corrections(params: Params, since: datetime | None) -> tuple[int, int, int]:
    """(corrected images with status ok, their correction rows, conflicting images) logged after ``since``."""
    store = PredictionLog(params.monitoring.resolved_db_uri())
    try:
        frame = store.corrections(since=since)
    except PredictionLogError as exc:
        raise RetrainError(f"cannot count the corrections: {exc}") from exc
    finally:
        store.dispose()
    ok = frame[frame["status"] == "ok"]
    conflicting = set(frame.loc[frame["status"] == "conflicting", "sha256"])
    return int(ok["sha256"].nunique()), len(ok), len(conflicting)


# --------------------------------------------------------------------------------------------- the decision


def _drift_reason(drift: Mapping[str, Any], window_days: float) -> str:
    status = drift["status"]
    details = "; ".join(drift.get("reasons") or [])
    if status == "drift":
        return f"drift in the last {window_days:g} days of predictions" + (f": {details}" if details else "")
    if status == "no_drift":
        return f"no drift in the last {window_days:g} days of predictions" + (f" ({details})" if details else "")
    if status == "not_enough_data":
        return f"drift check: {details}" if details else "not enough data for a drift check"
    return details or "no drift summary"


def retrain_decision(
    params: Params,
    *,
    force: bool = False,
    drift: Mapping[str, Any] | None = None,
    drift_file: Path = DRIFT_FILE,
) -> Decision:
    """Retrain or not, and why. ``drift``: a summary just computed (else read from ``drift_file``)."""
    summary = check_drift(drift) if drift is not None else read_drift(drift_file)
    m = params.monitoring
    champion = find_champion(params)
    since = champion.trained_at if champion else None
    n_images, n_rows, conflicting = new_corrections(params, since)

    reasons: list[str] = []
    if force:
        reasons.append(FORCED_REASON)
    reasons.append(_drift_reason(summary, m.window_days))
    rows = f" ({n_rows} correction rows)" if n_rows != n_images else ""
    if champion is None:
        base = "since the beginning of the log (no champion yet)"
    else:
        base = f"since champion v{champion.version} was trained ({champion.trained_at:%Y-%m-%d %H:%M} UTC)"
    passes = n_images >= m.retrain_min_corrections
    reasons.append(f"{n_images} newly corrected images{rows} {base}, {'≥' if passes else '<'} the threshold "
                   f"monitoring.retrain_min_corrections={m.retrain_min_corrections}")  # fmt: skip
    if conflicting:
        reasons.append(f"{conflicting} images with conflicting corrections not counted (left out until resolved)")

    if summary["status"] == "drift":
        trigger = "drift"
    elif passes:
        trigger = "corrections"
    elif force:
        trigger = "forced"
    else:
        trigger = "none"
    return Decision(
        run=trigger != "none",
        reasons=reasons,
        trigger=trigger,
        drift_status=str(summary["status"]),
        n_new_corrections=n_images,
        champion_version=champion.version if champion else None,
        champion_data_version=champion.data_version if champion else None,
        threshold=m.retrain_min_corrections,
        since=since,
        conflicting=conflicting,
        feedback_images=count_feedback_images(m.feedback_dir),
        champion_feedback_images=champion.feedback_images if champion else None,
        drift=summary,
    )
