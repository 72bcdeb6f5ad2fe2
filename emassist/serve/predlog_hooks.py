"""Hooks that append the product's answers to the prediction log (:mod:`emassist.data.predlog`).

Shared by the scoring server (the pyfunc's opt-in hook: :data:`ENV_PREDICTION_LOG`), ``emassist predict`` and
``emassist scan``: what one image's file says about itself (:class:`ImageFacts`: sha256 of the file's bytes as
ingest computes it, size, format, SEM metadata, brightness/contrast of the standardized image), which model answered
(:class:`ModelIdentity`), and opening a :class:`~emassist.data.predlog.LogWriter` so that a store that is down costs
a warning, never an answer.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from types import FrameType
from typing import Any

import numpy as np

from emassist.config.settings import MonitoringParams
from emassist.data.decode import DecodedImage
from emassist.data.hashing import sha256_of
from emassist.data.predlog import (
    LogWriter,
    PredictionLog,
    PredictionLogError,
    PredictionRow,
    image_stats,
    safe_url,
    utcnow,
)

log = logging.getLogger("emassist.serving")

#: The scoring server logs its answers when this holds an SQLAlchemy URL (the server has no params.yaml).
ENV_PREDICTION_LOG = "EMASSIST_PREDICTION_LOG"
#: What the server logs as the model: the pyfunc cannot know its registry name, version or alias.
ENV_MODEL_NAME = "EMASSIST_MODEL_NAME"
ENV_MODEL_VERSION = "EMASSIST_MODEL_VERSION"
ENV_MODEL_ALIAS = "EMASSIST_MODEL_ALIAS"


@dataclass(frozen=True)
class ImageFacts:
    """What a logged row says about the image itself (everything but the answer)."""

    sha256: str
    width: int | None = None
    height: int | None = None
    format: str | None = None
    pixel_size_nm: float | None = None
    magnification: float | None = None
    instrument: str | None = None
    brightness: float | None = None  # of the standardized image
    contrast: float | None = None

    @classmethod
    def of(cls, sha256: str, decoded: DecodedImage | None, standardized: np.ndarray | None) -> ImageFacts:
        """From the file's sha256, its decode (header size, format, SEM metadata) and its standardized image."""
        meta: Mapping[str, Any] = (decoded.metadata or {}) if decoded is not None else {}
        brightness, contrast = image_stats(standardized) if standardized is not None else (None, None)
        return cls(
            sha256=sha256,
            width=decoded.width if decoded is not None else None,
            height=decoded.height if decoded is not None else None,
            format=decoded.format if decoded is not None else None,
            pixel_size_nm=meta.get("pixel_size_nm"),
            magnification=meta.get("magnification"),
            instrument=meta.get("instrument"),
            brightness=brightness,
            contrast=contrast,
        )

    @classmethod
    def later(cls, data: bytes, decoded: DecodedImage, standardized: np.ndarray) -> Callable[[], ImageFacts]:
        """:meth:`of` with the costly part (the sha256 of ``data``, the statistics of ``standardized``) put off until
        the returned function is called (the prediction log's writer thread calls it). What the header says is
        taken now, so the full-size decoded image is not kept alive."""
        header = cls.of("", decoded, None)

        def build() -> ImageFacts:
            brightness, contrast = image_stats(standardized)
            return replace(header, sha256=sha256_of(data), brightness=brightness, contrast=contrast)

        return build


_FACT_FIELDS = fields(ImageFacts)


@dataclass(frozen=True)
class ModelIdentity:
    """The model a row names: registered name, version and the alias that resolved to it ("" when unknown)."""

    name: str = ""
    version: str = ""
    alias: str = ""

    @classmethod
    def from_env(cls) -> ModelIdentity:
        """The scoring server's: :data:`ENV_MODEL_NAME` / :data:`ENV_MODEL_VERSION` / :data:`ENV_MODEL_ALIAS`."""
        env = os.environ
        return cls(env.get(ENV_MODEL_NAME, ""), env.get(ENV_MODEL_VERSION, ""), env.get(ENV_MODEL_ALIAS, ""))

    @classmethod
    def from_uri(cls, uri: str, client: Any = None) -> ModelIdentity:
        """``models:/NAME@ALIAS`` (the version looked up with ``client``, an ``MlflowClient``; "" when that fails),
        ``models:/NAME/VERSION``, or a file/folder (its base name, no version)."""
        text = str(uri)
        if not text.startswith("models:/"):
            return cls(os.path.basename(text.rstrip("/")))
        rest = text[len("models:/") :]
        if "@" not in rest:
            name, _, version = rest.partition("/")
            return cls(name, version)
        name, alias = rest.split("@", 1)
        version = ""
        if client is not None:
            try:
                version = str(client.get_model_version_by_alias(name, alias).version)
            except Exception:  # an unknown alias fails the load itself; here the version is only informative
                version = ""
        return cls(name, version, alias)


def prediction_row(
    source: str,
    facts: ImageFacts,
    model: ModelIdentity,
    *,
    label: str,
    confidence: float,
    probabilities: Mapping[str, float],
    needs_review: bool,
    unfamiliar: bool | None = None,
    unfamiliar_score: float | None = None,
    origin: str = "",
    ts: datetime | None = None,
) -> PredictionRow:
    """One :class:`PredictionRow` from an image's facts, the model and its answer (``ts``: when it was answered;
    default now)."""
    return PredictionRow(
        ts=ts or utcnow(),
        source=source,
        origin=origin,
        **{f.name: getattr(facts, f.name) for f in _FACT_FIELDS},  # ImageFacts' fields are PredictionRow's
        model_name=model.name,
        model_version=model.version,
        model_alias=model.alias,
        label=label,
        confidence=float(confidence),
        probabilities={str(k): float(v) for k, v in probabilities.items()},
        needs_review=bool(needs_review),
        unfamiliar=None if unfamiliar is None else bool(unfamiliar),
        unfamiliar_score=None if unfamiliar_score is None else float(unfamiliar_score),
    )


def open_writer(
    db_uri: str, monitoring: MonitoringParams | None = None, *, check_now: bool = False
) -> tuple[LogWriter | None, str]:
    """``(writer, "")``, or ``(None, why)`` when the store cannot be used.

    ``monitoring`` gives the batching (its defaults when None). ``check_now``: open the store (create its tables)
    before returning, so that a short-lived command learns at once that it is down (one warning, nothing logged);
    without it (the long-running server) an unreachable store is the writer's to retry, only a URL that cannot be
    used at all is refused here."""
    m = monitoring or MonitoringParams()
    try:
        store = PredictionLog(db_uri)
        if check_now:
            store.ensure_tables()
    except PredictionLogError as exc:
        return None, str(exc)
    except Exception as exc:  # e.g. a driver that fails in its own way: the log is optional, the answer is not
        return None, f"cannot open the prediction log {safe_url(db_uri)}: {type(exc).__name__}: {exc}"
    writer = LogWriter(store, batch_size=m.batch_size, flush_interval_s=m.flush_interval_s, max_pending=m.max_pending)
    return writer, ""


def write_through_on_stop(writer: LogWriter, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> bool:
    """On a stop signal, switch ``writer`` to :meth:`~emassist.data.predlog.LogWriter.write_through` (pending rows
    written at once, later ones as they come), then hand the signal on to the handler that was there before.

    For the scoring server: uvicorn catches SIGTERM, finishes the requests in flight and then re-raises the signal
    with the default handler, so no exit handler runs and rows queued in the writer would be lost. Only the main
    thread can set handlers: elsewhere nothing is changed (False)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in signals:
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            writer.write_through()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        signal.signal(sig, handler)
    return True
