"""The SEM classifier as an MLflow pyfunc model (``emassist/serve/model_code.py`` is the logged code).

Request: a DataFrame with one string column ``image``: each value is a base64-encoded image file in any format
ingest accepts (PNG, JPEG, 8/16-bit TIFF, BMP, ...; an optional ``data:...;base64,`` prefix is allowed).
Every image takes THE path training took, through the model's own
:class:`emassist.data.preprocess.Preprocessor` (built from its serving config): decode → data-bar crop →
cache-size resize → ``to_model_input`` → the Keras model, in chunks of ``chunk_size``.

Inference parameter ``standardized`` (boolean, default false; declared in the signature, sent as
``{"params": {"standardized": true}}`` beside ``dataframe_split``): the images are already standardized by the
caller (e.g. tiles cut by the tile scan from an overview whose data bar was cropped once), so they get no
data-bar search of their own and are only resized to the model's cache size. A value that is not a boolean is
refused by MLflow's signature check (HTTP 400 naming the parameter).

Optional column ``pixel_size_nm`` (a scale-aware model, :mod:`emassist.model.scale`): the pixel size of each
uploaded file in nm. Without it the model reads each file's own pixel size as ingest does (TIFF tags, else the data
bar through OCR when the engine is installed, else unknown: the model still answers, as trained for unknown sizes).
A value that is negative, zero, NaN/null or absurd (outside ``MIN_PIXEL_SIZE_NM``..``MAX_PIXEL_SIZE_NM`` of
:mod:`emassist.config.choices`) is HTTP 400 naming the row. An already standardized image (``standardized``) carries
no tags or bar: send its ``pixel_size_nm`` (of the image sent) or its size is unknown. A model without the scale
input ignores the column and answers exactly as before.

Response: one row per input row: ``label``, ``confidence``, one probability column per class (named by the
class), ``error`` ("" when the row is fine), then whether to trust it: ``needs_review`` (true when the answer should
be checked by a person), ``review_reason`` (why, "" when not), ``unfamiliar`` (the image is unlike the training
data) and ``unfamiliar_score`` (the familiarity distance over its threshold: above 1 is unfamiliar; 0 when the model
ships no familiarity file). A scale-aware model adds the pixel size it used: ``pixel_size_nm`` (of the file),
``model_pixel_size_nm`` (of the model input: the file's times its width over the model's input side), both JSON
``null`` when unknown, and ``pixel_size_source`` (``request | tags | databar_scalebar | databar_mag | unknown``).

Trust (see :mod:`emassist.model.selective` and :mod:`emassist.model.familiarity`): the review threshold fitted on val
(``review_threshold`` in the serving config; null: every answer needs review) and the familiarity file
(``familiarity`` artifact) come with the model. A model registered before them gets the legacy fixed threshold 0.5
(``review_policy.source == "legacy"``) and no unfamiliar flag.

Prediction log (opt-in; :mod:`emassist.serve.predlog_hooks`): when ``EMASSIST_PREDICTION_LOG`` holds an SQLAlchemy
URL (e.g. ``sqlite:////var/lib/emassist/monitoring.db``), every answered row of a request (not the bad rows, not
``standardized`` tile requests, whose caller logs the scan's summary) is queued as one ``source="server"`` row:
the sha256 of the decoded file bytes, size/format/SEM metadata from the decode, brightness/contrast of the
standardized image, the model as ``EMASSIST_MODEL_NAME`` / ``EMASSIST_MODEL_VERSION`` / ``EMASSIST_MODEL_ALIAS`` say
(the pyfunc cannot know its registry version), and the answer. Recording is a queue append (the row itself, hash
and statistics included, is built on the writer's thread, off the request path); a background
:class:`~emassist.data.predlog.LogWriter` writes batches, keeps rows while the store is down (one warning) and
writes every 0.25 s (``SERVER_FLUSH_INTERVAL_S``; ``EMASSIST_PREDICTION_LOG_FLUSH_S`` overrides), and writes through
from SIGTERM/SIGINT on (uvicorn's process runs no atexit handlers; a SIGKILL loses at most the last interval). A
store that is down never costs an answer.

Calibration: the probabilities are ``softmax(log p / T)`` of the Keras model's softmax ``p``, with the temperature
``T`` of the serving config (``temperature``, fitted on val by the evaluate stage, see
:mod:`emassist.model.calibration`). A model registered without one (before calibration existed) is served
uncalibrated (``T = 1``, :attr:`SemClassifier.calibrated` false).

Bad requests (see serving/README.md):

* no ``image`` column or no rows → HTTP 400 ``INVALID_PARAMETER_VALUE`` with a one-line message;
* every row a bad image (not base64, not an image, too small, over ``max_pixels``, not a string, ...; always the
  case for a one-image request) → HTTP 400 naming each bad row and why (the first 10);
* some rows bad, others fine → HTTP 200; the bad rows have ``error`` set, ``label`` "" and all
  probabilities (and ``confidence``) 0.0, so one broken file does not cost the rest of a batch;
* a failure of our own (a bug) → HTTP 500 with a one-line message; the traceback goes to the server's log only.

The scoring server rewrites a model's ``MlflowException`` message into ``Failed to predict data '<the whole
input>'. Error: ...`` (an echo of the request's base64). :class:`BadRequest` keeps its own short message.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, partial
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from emassist.config.settings import MonitoringParams
from emassist.data.decode import ImageRejected, read_bytes
from emassist.data.predlog import LogWriter, PredictionRow, utcnow
from emassist.data.preprocess import STANDARDIZED_PARAM, Preprocessor
from emassist.model.calibration import apply_temperature, as_temperature
from emassist.model.familiarity import Familiarity
from emassist.model.features import with_features
from emassist.model.scale import (
    SCALE_DIM,
    ScaleUsed,
    has_scale_input,
    model_inputs,
    pixel_size_problem,
    scale_batch,
    unknown_scale,
)
from emassist.model.selective import ReviewPolicy
from emassist.serve.pixel_size import file_pixel_size
from emassist.serve.predlog_hooks import (
    ENV_PREDICTION_LOG,
    ImageFacts,
    ModelIdentity,
    open_writer,
    prediction_row,
    write_through_on_stop,
)

log = logging.getLogger("emassist.serving")

IMAGE_COLUMN = "image"
PIXEL_SIZE_COLUMN = "pixel_size_nm"  # optional request column of a scale-aware model (nm per pixel of the file)
#: The columns a scale-aware model's answer adds after the trust columns.
SCALE_COLUMNS = ("pixel_size_nm", "model_pixel_size_nm", "pixel_size_source")
SERVER_FLUSH_INTERVAL_S = 0.25  # the scoring server's prediction-log writer (it has no params.yaml)
ENV_FLUSH_INTERVAL = "EMASSIST_PREDICTION_LOG_FLUSH_S"  # overrides it (seconds)
ERROR_COLUMN = "error"
#: The columns after ``error`` saying whether to trust an answer (bools, a reason, a score).
TRUST_COLUMNS = ("needs_review", "review_reason", "unfamiliar", "unfamiliar_score")
DEFAULT_CHUNK_SIZE = 32
MAX_LISTED_ERRORS = 10  # bad rows named in one error message


class BadRequest(MlflowException):
    """An ``MlflowException`` whose message the scoring server cannot prefix with an echo of the input."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)

    @property  # type: ignore[override]
    def message(self) -> str:
        return self._short_message

    @message.setter
    def message(self, value: str) -> None:
        # The first assignment (from __init__) wins; the server's "Failed to predict data '...'" rewrite is ignored.
        if not hasattr(self, "_short_message"):
            self._short_message = str(value)


def decode_base64(value: Any) -> bytes:
    """Bytes of one request cell; raises ``ImageRejected`` with a short reason."""
    if not isinstance(value, str | bytes):
        raise ImageRejected(f"expected a base64 string, got {type(value).__name__}")
    try:  # fast path: plain standard base64, checked strictly in C
        data = binascii.a2b_base64(value, strict_mode=True)
        if data:
            return data
    except (binascii.Error, ValueError):
        pass  # whitespace, a data: prefix, the URL-safe alphabet, missing padding, or not base64 at all
    text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
    text = "".join(text.split())  # MIME base64 wraps lines
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if not text:
        raise ImageRejected("empty image string")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")  # URL-safe alphabet
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected(f"not valid base64 ({exc})") from exc
    if not data:
        raise ImageRejected("empty image string")
    return data


def describe_errors(errors: Sequence[str], n_rows: int) -> str:
    bad = [(i, e) for i, e in enumerate(errors) if e]
    shown = "; ".join(f"row {i}: {e}" for i, e in bad[:MAX_LISTED_ERRORS])
    more = f"; and {len(bad) - MAX_LISTED_ERRORS} more" if len(bad) > MAX_LISTED_ERRORS else ""
    what = "image rejected" if n_rows == 1 else f"all {n_rows} images rejected"
    return f"{what}: {shown}{more}"


@dataclass
class Prepared:
    """One input made ready for the model: the standardized image, or None and the reason; with ``details``, what
    the prediction log records about the file (:attr:`facts`, worked out on first use: the scoring server leaves that
    to the log's writer thread)."""

    image: np.ndarray | None
    error: str = ""
    facts_later: Callable[[], ImageFacts] | None = None
    scale: ScaleUsed | None = None  # the pixel size a scale-aware model gets (None: a model without the input)

    @cached_property
    def facts(self) -> ImageFacts | None:
        """:class:`~emassist.serve.predlog_hooks.ImageFacts` of the file (None without ``details``)."""
        return self.facts_later() if self.facts_later is not None else None


def config_temperature(config: dict[str, Any]) -> tuple[float, bool]:
    """``(T, calibrated)`` from a serving config: its ``temperature``, or ``(1.0, False)`` when it has none (a model
    registered before calibration) or an unusable one (logged; serving it uncalibrated beats not serving it)."""
    value = config.get("temperature")
    if value is None:
        return 1.0, False
    try:
        return as_temperature(value), True
    except ValueError:
        log.warning("serving config temperature %r is not a positive number: serving uncalibrated", value)
        return 1.0, False


def _optional_numbers(values: Sequence[float | None]) -> pd.Series:
    """A column of numbers where some may be unknown: float64 when all are known, else objects with ``None``, which
    the scoring server writes as JSON ``null`` (a float column's NaN it writes as ``NaN``, which is not JSON)."""
    if all(v is not None for v in values):
        return pd.Series(values, dtype=np.float64)
    return pd.Series([None if v is None else float(v) for v in values], dtype=object)


class SemClassifier(mlflow.pyfunc.PythonModel):
    """Keras SEM morphology classifier behind the ingest/training preprocessing."""

    # The explicit signature logged with the model is the contract. MLflow's type-hint validation (and its
    # warning that predict has no supported hint) would only switch the server to another request format.
    _skip_type_hint_validation = True

    classes: list[str]
    preprocessor: Preprocessor
    chunk_size: int
    decode_threads: int
    temperature: float  # 1.0 when the serving config has none (uncalibrated)
    calibrated: bool  # whether the serving config carried a temperature
    review_policy: ReviewPolicy  # decides needs_review from the confidence and the unfamiliar flag
    familiarity: Familiarity | None  # None: a model registered without one (no unfamiliar flag)
    training_data: dict[str, Any] | None  # source / version / synthetic / notice; None for older models
    config: dict[str, Any]  # the serving config as loaded
    prediction_log: LogWriter | None = None  # the opt-in server hook (EMASSIST_PREDICTION_LOG); None: not logging
    model_identity: ModelIdentity = ModelIdentity()  # what the log names as the model

    def load_context(self, context: Any) -> None:
        with open(context.artifacts["config"], encoding="utf-8") as fh:
            config = json.load(fh)
        self.load(context.artifacts["keras_model"], config, familiarity=context.artifacts.get("familiarity"))

    @classmethod
    def from_files(
        cls,
        keras_model: str | os.PathLike[str],
        config: dict[str, Any],
        familiarity: str | os.PathLike[str] | None = None,
    ) -> SemClassifier:
        """The same model outside MLflow (a ``.keras`` file, the serving config and, optionally, the familiarity
        file the evaluate stage wrote), e.g. for ``emassist predict``."""
        model = cls()
        model.load(keras_model, config, familiarity=familiarity)
        return model

    def load(
        self,
        keras_model: str | os.PathLike[str],
        config: dict[str, Any],
        *,
        familiarity: str | os.PathLike[str] | None = None,
    ) -> None:
        import keras  # lazy: loading Keras/TensorFlow takes seconds; the module is imported by the registry too
        import tensorflow as tf

        self.configure(config)
        self.familiarity = Familiarity.load(familiarity) if familiarity is not None else None
        self.model = keras.models.load_model(keras_model, compile=False)
        scorer = with_features(self.model)
        pre = self.preprocessor
        self.scale_aware = has_scale_input(self.model)
        if bool(config.get("scale_input", False)) != self.scale_aware:
            log.warning("the serving config says scale_input=%s, the model says %s: following the model",
                        config.get("scale_input", False), self.scale_aware)  # fmt: skip
        gray_spec = tf.TensorSpec([None, None, None, 1], tf.uint8)
        zeros = np.zeros((1, pre.cache_size, pre.cache_size, 1), dtype=np.uint8)

        # One compiled forward pass gives the probabilities and the penultimate features together.
        if self.scale_aware:

            @tf.function(input_signature=[gray_spec, tf.TensorSpec([None, SCALE_DIM], tf.float32)],
                         reduce_retracing=True)  # fmt: skip
            def forward_scaled(gray: Any, scale: Any) -> Any:
                return scorer(model_inputs(pre.to_model_input(gray), scale, scale_aware=True), training=False)

            self._forward_scaled = forward_scaled
            self._forward = lambda gray: forward_scaled(gray, unknown_scale(len(gray)))
            self._forward_scaled(zeros, unknown_scale(1))  # trace once now, not on the first request
            from emassist.data.scalebar import engine_available  # lazy: only a scale-aware model reads bars

            self.bar_not_read = engine_available()
            if self.bar_not_read:
                log.warning("data bars are not read (%s): a file without pixel-size tags gets an unknown size",
                            self.bar_not_read)  # fmt: skip
        else:

            @tf.function(input_signature=[gray_spec], reduce_retracing=True)
            def forward(gray: Any) -> Any:
                return scorer(pre.to_model_input(gray), training=False)

            self._forward = forward
            # Trace once now, not on the first request.
            self._forward(zeros)
        self.open_prediction_log()

    def open_prediction_log(self, db_uri: str | None = None) -> LogWriter | None:
        """Start the server's prediction log when ``db_uri`` (default: ``$EMASSIST_PREDICTION_LOG``) is set; it is
        written every ``SERVER_FLUSH_INTERVAL_S``, written through from a stop signal on (SIGTERM/SIGINT: the
        requests the server still finishes are logged before it exits) and closed at interpreter exit where that
        runs. A URL that cannot be used: one warning, no log."""
        if self.prediction_log is not None:
            return self.prediction_log
        url = db_uri if db_uri is not None else os.environ.get(ENV_PREDICTION_LOG, "").strip()
        if not url:
            return None
        # uvicorn's process does not run atexit handlers on its way out (measured): a stop signal switches the writer
        # to write-through (write_through_on_stop); a short interval bounds what a SIGKILL can take.
        try:
            interval = float(os.environ.get(ENV_FLUSH_INTERVAL) or SERVER_FLUSH_INTERVAL_S)
            MonitoringParams(flush_interval_s=interval).check()
        except ValueError as exc:
            log.warning("%s: %s; using %s s", ENV_FLUSH_INTERVAL, exc, SERVER_FLUSH_INTERVAL_S)
            interval = SERVER_FLUSH_INTERVAL_S
        writer, why = open_writer(url, MonitoringParams(flush_interval_s=interval))
        if writer is None:
            log.warning("prediction log off: %s", why)
            return None
        self.prediction_log = writer
        self.model_identity = ModelIdentity.from_env()
        atexit.register(writer.close)
        write_through_on_stop(writer)
        self._log_failed = False
        return writer

    def configure(self, config: dict[str, Any]) -> None:
        self.classes = [str(c) for c in config["classes"]]
        self.preprocessor = Preprocessor.from_config(config)
        if self.preprocessor.image_size is None:
            raise ValueError("the serving config has no image_size")
        self.chunk_size = max(1, int(config.get("chunk_size", DEFAULT_CHUNK_SIZE)))
        self.decode_threads = max(1, int(config.get("decode_threads", min(4, os.cpu_count() or 1))))
        self.temperature, self.calibrated = config_temperature(config)
        self.review_policy = ReviewPolicy.served(config)
        self.training_data = config.get("training_data") if isinstance(config.get("training_data"), dict) else None
        self.familiarity = getattr(self, "familiarity", None)
        self.config = dict(config)
        self.scale_aware = bool(config.get("scale_input", False))  # load() follows the model itself
        self.bar_not_read: str | None = getattr(self, "bar_not_read", None)
        self._pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------------------------------- building blocks

    def standardized(self, value: Any, *, standardized: bool = False) -> np.ndarray:
        """One request cell (base64) → the cache-size uint8 grayscale image ingest would have cached."""
        return self.standardized_bytes(decode_base64(value), standardized=standardized)

    def standardized_bytes(self, data: bytes | str | os.PathLike[str], *, standardized: bool = False) -> np.ndarray:
        """Image file bytes (or a path) → the cache-size uint8 grayscale image ingest would have cached.

        ``standardized``: the image is already standardized (e.g. a tile): decoded and resized, no data-bar search.
        """
        pre = self.preprocessor
        if standardized:
            return pre.resize(pre.decode(data).gray)
        return pre.standardize_file(data)[0]

    def standardize_many(
        self, values: Sequence[Any], *, files: bool = False, standardized: bool = False
    ) -> list[tuple[np.ndarray | None, str]]:
        """``(image, "")`` or ``(None, reason)`` per base64 value (or per file path when ``files``).

        Decoded on a few threads (PIL's decoders and NumPy release the GIL).
        """
        return [(p.image, p.error) for p in self.prepare_many(values, files=files, standardized=standardized)]

    def prepare(
        self,
        value: Any,
        *,
        file: bool = False,
        standardized: bool = False,
        details: bool = False,
        pixel_size_nm: float | None = None,
    ) -> Prepared:
        """One base64 value (or a file path when ``file``) → :class:`Prepared`; never raises for a bad image.

        ``details``: also the facts the prediction log keeps (sha256 of the file's bytes, the decode's size, format
        and SEM metadata, brightness/contrast of the standardized image): a hash and two means, nothing decoded
        twice. A scale-aware model: :attr:`Prepared.scale` is ``pixel_size_nm`` (the caller's, already checked) or
        the file's own (:meth:`scale_of`)."""
        try:
            data = value if file else decode_base64(value)
            if file and details:  # read the file once: the decode and the hash take the same bytes
                data = read_bytes(data)
            pre = self.preprocessor
            decoded = pre.decode(data)
            rows: int | None = None
            if standardized:
                gray = pre.resize(decoded.gray)
            else:
                gray, rows = pre.standardize(decoded.gray)
            scale = self.scale_of(decoded, rows, standardized, pixel_size_nm) if self.scale_aware else None
            if not details:
                return Prepared(gray, scale=scale)
            return Prepared(gray, "", ImageFacts.later(data, decoded, gray), scale)
        except ImageRejected as exc:
            return Prepared(None, exc.reason)
        except Exception as exc:  # a bug met by one odd image must not fail the others
            log.exception("cannot process an image")
            return Prepared(None, f"cannot process image ({type(exc).__name__})")

    def scale_of(
        self, decoded: Any, bar_rows: int | None, standardized: bool, pixel_size_nm: float | None = None
    ) -> ScaleUsed:
        """The pixel size a scale-aware model gets for one decoded file: the caller's ``pixel_size_nm``, else the
        file's tags or data bar (the rows the preprocessor cropped; ``bar_rows`` None: it does not crop, the bar is
        looked for), else unknown; scaled by the file's width over the model's input side."""
        size = int(self.preprocessor.image_size or 0)
        if pixel_size_nm is not None:
            return ScaleUsed.of(pixel_size_nm, "request", decoded.width, size)
        if standardized:
            return ScaleUsed.unknown("an already standardized image carries no tags or data bar (send pixel_size_nm)")
        if not self.preprocessor.crop_databar:
            bar_rows = None
        nm, source, reason = file_pixel_size(decoded, bar_rows, bar_not_read=self.bar_not_read)
        return ScaleUsed.of(nm, source, decoded.width, size, reason)

    def prepare_many(
        self,
        values: Sequence[Any],
        *,
        files: bool = False,
        standardized: bool = False,
        details: bool = False,
        pixel_sizes: Sequence[float | None] | None = None,
    ) -> list[Prepared]:
        """:meth:`prepare` of each value, on a few threads (PIL's decoders and NumPy release the GIL).
        ``pixel_sizes``: one checked pixel size (or None) per value, for a scale-aware model."""
        sizes = list(pixel_sizes) if pixel_sizes is not None else [None] * len(values)

        def one(item: tuple[Any, float | None]) -> Prepared:
            value, nm = item
            return self.prepare(value, file=files, standardized=standardized, details=details, pixel_size_nm=nm)

        items = list(zip(values, sizes, strict=True))
        if len(values) < 2 or self.decode_threads < 2:
            return [one(v) for v in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="sem-decode")
        return list(self._pool.map(one, items))

    def score(self, gray: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[B, H, W]`` or ``[B, H, W, 1]`` standardized images → (calibrated probabilities float32
        ``[B, n_classes]``, unfamiliar scores float64 ``[B]``: distance over threshold, 0 without a familiarity
        file). ``scale``: float32 ``[B, 2]``, the ``"scale"`` input of a scale-aware model
        (:func:`~emassist.model.scale.scale_batch`); None: every size unknown. A model without it ignores it."""
        batch = np.asarray(gray, dtype=np.uint8)
        if batch.ndim == 3:
            batch = batch[..., None]
        if self.scale_aware:
            scale = unknown_scale(len(batch)) if scale is None else np.asarray(scale, dtype=np.float32)
            if scale.shape != (len(batch), SCALE_DIM):
                raise ValueError(f"scale: expected shape ({len(batch)}, {SCALE_DIM}), got {scale.shape}")
        probas, scores = [], []
        for start in range(0, len(batch), self.chunk_size):
            part = batch[start : start + self.chunk_size]
            if self.scale_aware:
                assert scale is not None
                proba, features = self._forward_scaled(part, scale[start : start + self.chunk_size])
            else:
                proba, features = self._forward(part)
            probas.append(np.asarray(proba, dtype=np.float32))
            if self.familiarity is not None:
                scores.append(self.familiarity.score(np.asarray(features)))
        if not probas:
            return np.zeros((0, len(self.classes)), dtype=np.float32), np.zeros(0)
        proba = np.concatenate(probas)
        unfamiliar = np.concatenate(scores) if scores else np.zeros(len(proba))
        if self.temperature != 1.0:
            proba = apply_temperature(proba, self.temperature).astype(np.float32)
        return proba, unfamiliar

    def probabilities(self, gray: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``[B, H, W]`` or ``[B, H, W, 1]`` standardized images → calibrated float32 ``[B, n_classes]``
        (``scale``: as for :meth:`score`)."""
        return self.score(gray, scale)[0]

    def review(self, confidence: float, unfamiliar_score: float) -> tuple[bool, bool, str]:
        """``(needs_review, unfamiliar, reason)`` of one answer, by the model's :class:`ReviewPolicy`."""
        unfamiliar = self.familiarity is not None and unfamiliar_score > 1.0
        needs, reason = self.review_policy.decide(confidence, unfamiliar)
        return needs, unfamiliar, reason

    def result_frame(
        self,
        proba: np.ndarray,
        errors: Sequence[str],
        unfamiliar_scores: np.ndarray | None = None,
        scales: Sequence[ScaleUsed | None] | None = None,
    ) -> pd.DataFrame:
        ok = np.array([not e for e in errors], dtype=bool)
        best = proba.argmax(axis=1) if len(proba) else np.zeros(0, dtype=int)
        labels = [self.classes[int(k)] if good else "" for k, good in zip(best, ok, strict=True)]
        confidence = np.where(ok, proba.max(axis=1) if len(proba) else 0.0, 0.0).astype(np.float64)
        scores = np.zeros(len(errors)) if unfamiliar_scores is None else np.asarray(unfamiliar_scores, np.float64)
        reviews = [self.review(float(c), float(u)) if good else (True, False, "image rejected")
                   for c, u, good in zip(confidence, scores, ok, strict=True)]  # fmt: skip
        probabilities = proba.astype(np.float64)
        columns: dict[str, Any] = {"label": labels, "confidence": confidence}
        columns.update({name: probabilities[:, k] for k, name in enumerate(self.classes)})
        columns[ERROR_COLUMN] = list(errors)
        columns["needs_review"] = [r[0] for r in reviews]
        columns["review_reason"] = [r[2] for r in reviews]
        columns["unfamiliar"] = [r[1] for r in reviews]
        columns["unfamiliar_score"] = np.where(ok, scores, 0.0)
        if self.scale_aware:
            used = list(scales) if scales is not None else [None] * len(errors)
            columns["pixel_size_nm"] = _optional_numbers([None if u is None else u.nm for u in used])
            columns["model_pixel_size_nm"] = _optional_numbers([None if u is None else u.model_nm for u in used])
            columns["pixel_size_source"] = ["unknown" if u is None else u.source for u in used]
        return pd.DataFrame(columns)  # built at once: 15 column insertions cost ~1 ms a request

    # ----------------------------------------------------------------------------------------- pyfunc API

    # ``model_input`` stays unannotated: MLflow reads predict's type hints as a signature (see above).
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        values = self._image_values(model_input)
        standardized = self._standardized_param(params)
        n = len(values)
        pixel_sizes = self._pixel_sizes(model_input, n) if self.scale_aware else None
        scales: list[ScaleUsed | None] = [None] * n
        proba = np.zeros((n, len(self.classes)), dtype=np.float32)
        unfamiliar = np.zeros(n)
        errors = [""] * n
        logging_on = self.prediction_log is not None and not standardized  # tiles: the scan logs its summary
        facts: list[Prepared | None] = [None] * n
        try:
            for start in range(0, n, self.chunk_size):
                rows: list[int] = []
                images: list[np.ndarray] = []
                chunk = range(start, min(n, start + self.chunk_size))
                sizes = None if pixel_sizes is None else [pixel_sizes[i] for i in chunk]
                prepared = self.prepare_many(
                    [values[i] for i in chunk], standardized=standardized, details=logging_on, pixel_sizes=sizes
                )
                for i, p in zip(chunk, prepared, strict=True):
                    if p.image is None:
                        errors[i] = p.error
                    else:
                        images.append(p.image)
                        rows.append(i)
                        facts[i] = p
                        scales[i] = p.scale
                if images and self.scale_aware:
                    scale = scale_batch([scales[i] for i in rows])
                    proba[rows], unfamiliar[rows] = self.score(np.stack(images), scale)
                elif images:
                    proba[rows], unfamiliar[rows] = self.score(np.stack(images))
        except Exception as exc:  # a bug, not a bad request: log the traceback here, answer briefly
            log.exception("prediction failed")
            raise BadRequest(f"internal error while predicting: {type(exc).__name__}", INTERNAL_ERROR) from exc
        if all(errors):
            raise BadRequest(describe_errors(errors, n))
        if logging_on:
            self._log_answers(proba, unfamiliar, facts)
        return self.result_frame(proba, errors, unfamiliar, scales)

    def _log_answers(self, proba: np.ndarray, scores: np.ndarray, prepared: Sequence[Prepared | None]) -> None:
        """Queue one prediction-log row per answered row (``prepared`` set); never raises.

        The request thread only queues: the row (the file's sha256, image statistics, the review decision, as
        :meth:`result_frame` decides it) is built by the log's writer thread (:meth:`LogWriter.record_later`)."""
        writer = self.prediction_log
        if writer is None:
            return
        try:
            ts = utcnow()
            for i, p in enumerate(prepared):
                if p is not None:
                    writer.record_later(partial(self._log_row, p, proba[i].copy(), float(scores[i]), ts))
        except Exception:  # the answer matters more than its log line
            if not getattr(self, "_log_failed", False):
                log.exception("prediction log: answers could not be queued")
                self._log_failed = True

    def _log_row(self, prepared: Prepared, proba: np.ndarray, score: float, ts: datetime) -> PredictionRow:
        """One answered image's prediction-log row (called on the log's writer thread)."""
        p = proba.astype(np.float64)
        best = int(p.argmax())
        confidence = float(p[best])
        needs, unfamiliar, _ = self.review(confidence, score)
        checked = self.familiarity is not None
        facts = prepared.facts
        assert facts is not None  # only prepared with details reach the log
        return prediction_row(
            "server", facts, self.model_identity,
            label=self.classes[best],
            confidence=confidence,
            probabilities=dict(zip(self.classes, p.tolist(), strict=True)),
            needs_review=needs,
            unfamiliar=unfamiliar if checked else None,
            unfamiliar_score=score if checked else None,
            ts=ts,
        )  # fmt: skip

    @staticmethod
    def _standardized_param(params: dict[str, Any] | None) -> bool:
        """The ``standardized`` parameter (MLflow has checked its type where the signature declares it)."""
        value = (params or {}).get(STANDARDIZED_PARAM, False)
        if not isinstance(value, bool | np.bool_):
            raise BadRequest(f"parameter '{STANDARDIZED_PARAM}': expected true or false, got {value!r:.40}")
        return bool(value)

    @staticmethod
    def _pixel_sizes(model_input: Any, n: int) -> list[float | None] | None:
        """The request's checked ``pixel_size_nm`` per row (None: the column is absent, sizes come from the files);
        a bad value is a :class:`BadRequest` naming the rows (the first 10)."""
        if isinstance(model_input, pd.DataFrame):
            if PIXEL_SIZE_COLUMN not in model_input.columns:
                return None
            raw = model_input[PIXEL_SIZE_COLUMN].tolist()
        elif isinstance(model_input, dict) and PIXEL_SIZE_COLUMN in model_input:
            value = model_input[PIXEL_SIZE_COLUMN]
            raw = list(value) if isinstance(value, list | tuple | np.ndarray | pd.Series) else [value]
        else:
            return None
        if len(raw) != n:
            raise BadRequest(f"column '{PIXEL_SIZE_COLUMN}' has {len(raw)} values for {n} images")
        problems = [(i, pixel_size_problem(v if v is not None else float("nan"))) for i, v in enumerate(raw)]
        bad = [(i, why) for i, why in problems if why]
        if bad:
            shown = "; ".join(f"row {i}: {why}" for i, why in bad[:MAX_LISTED_ERRORS])
            more = f"; and {len(bad) - MAX_LISTED_ERRORS} more" if len(bad) > MAX_LISTED_ERRORS else ""
            raise BadRequest(f"bad '{PIXEL_SIZE_COLUMN}' (nm per pixel of the file): {shown}{more}")
        return [float(v) for v in raw]

    @staticmethod
    def _image_values(model_input: Any) -> list[Any]:
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                # The signature marks the column optional so that this message, not MLflow's schema error (which
                # echoes the whole input), answers a request without it; other columns never reach us.
                raise BadRequest(f"the request has no column '{IMAGE_COLUMN}' (base64-encoded image files, one a row)")
            values = model_input[IMAGE_COLUMN].tolist()
        elif isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
            raw = model_input[IMAGE_COLUMN]
            values = [raw] if isinstance(raw, str | bytes) else list(raw)
        elif isinstance(model_input, pd.Series | list | tuple | np.ndarray):
            values = list(model_input)
        else:
            raise BadRequest(
                f"expected a table with a column '{IMAGE_COLUMN}' of base64 strings, got {type(model_input).__name__}"
            )
        if not values:
            raise BadRequest(f"the request has no rows: send at least one base64 image in column '{IMAGE_COLUMN}'")
        return values
