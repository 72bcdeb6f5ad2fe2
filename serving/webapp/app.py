"""The microscopist's page: upload SEM images, see the top-3 classes, a Grad-CAM overlay, and scan a large
overview image for one class. FastAPI, one static page (``static/``), no build step.

HTTP API (every error is JSON ``{"error": "<one line>"}`` with a 4xx/5xx status; the server keeps answering):

* ``GET  /api/health`` — ``{"status": "ok"}`` (200) once the model is loaded; while it loads ``{"status": "loading",
  "seconds": S}`` and, when it could not be loaded, ``{"status": "error", "error": "<why>"}``, both with 503 (a
  readiness probe, and the tests' start-up wait, wait for the 200).
* ``GET  /api/info`` — model name, version, alias and source; classes; limits; tile defaults.
* ``POST /api/classify?filename=NAME`` — body: the image file. → label, top-3, all probabilities, the
  low-confidence flag, a PNG preview of what the model saw (data bar cropped).
* ``GET  /api/gradcam/{id}?class=NAME`` — Grad-CAM overlay (PNG data URL) for a classified image.
* ``GET  /api/results.csv?ids=a,b`` — the batch as CSV (all results of this server when ``ids`` is absent).
* ``POST /api/correct`` — JSON ``{"id", "label", "who"}``: "this result is really LABEL". The upload's original
  bytes are stored once under ``monitoring.feedback_dir/<Class>/<sha256>.<ext>`` and the correction is logged
  (:mod:`emassist.data.feedback`); the answer says what was stored (``status``: stored, repeat, conflicting).
* ``POST /api/scan?filename=NAME&class=C&tile=256&stride=128`` — body: the overview image. → heat map overlay
  of class C, the score grid, the tile count and time. ``GET /api/scan/{id}/heatmap?class=C`` redraws it for
  another class; ``GET /api/scan/{id}/tiles.csv`` gives every tile's scores.
* ``GET  /api/live`` — the watched folder (``emassist web --watch DIR``; null when none) and its recent arrivals;
  ``GET /api/live/events`` streams each arrival as it is answered (Server-Sent Events, ``event: arrival``, the
  id ``<server epoch>-<seq>``: a reconnecting browser sends ``Last-Event-ID`` and gets only what it missed, or,
  after a server restart, everything the new server has): file, status, label, confidence, needs-review, alert, a
  thumbnail of what the model saw.

Uploads are held in memory, bounded by the page's own limits (``webapp.max_upload_bytes``, and
``webapp.max_pixels`` on the declared size, checked from the header before decoding); types are decided by content,
never by the name. Every image then goes through the model's own preprocessor (``backend.preprocessor``: its decode
limits, data-bar crop and cache size), the one the classifier, Grad-CAM and the tile scan share. The process's
temporary folder is a private folder under ``webapp.temp_dir`` removed at exit; corrected images go to
``monitoring.feedback_dir``.

Every answer is logged (``monitoring.log_predictions``) to the prediction log (``monitoring.db_uri``) through a
background :class:`emassist.data.predlog.LogWriter` opened at start-up and closed at shutdown: classifying never
waits for the database, and a store that is down costs one warning, not an answer. The original bytes of the last
:data:`KEEP_UPLOADS` uploads (at most :data:`KEEP_UPLOAD_BYTES` in all) are kept for corrections; an older result
can no longer be corrected (410, saying so).

Start-up (docs/startup.md): the page and the health check answer at once; the model loads on a thread of its own
(:class:`emassist.serve.backend.BackendLoader`) while the page says "loading the model...". Until it is ready, every
request that needs the model (info, classify, Grad-CAM, scan, CSV, corrections, the model card, the Live tab) gets
503 with ``{"error": "the model is still loading ...", "status": "loading"}`` and ``Retry-After``; a model that
cannot be loaded leaves the page up saying why (503, ``"status": "error"``). Nothing heavy (TensorFlow, MLflow,
pandas) is imported before the server answers: those imports happen on the loading thread.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles

from emassist.config.settings import Params
from emassist.data.decode import DecodedImage, ImageRejected, check_pixels, probe_image
from emassist.data.hashing import sha256_of
from emassist.data.predlog import LogWriter, PredictionLog, PredictionLogError, PredictionRow, image_stats
from emassist.model.provenance import describe_training_data
from emassist.model.scale import ScaleUsed
from emassist.model.selective import ReviewPolicy
from emassist.serve import tilescan
from emassist.serve.backend import Backend, BackendError, BackendLoader, BackendNotFound
from emassist.serve.drawing import overlay, png_bytes
from emassist.serve.gradcam import GradCam, GradCamError

if TYPE_CHECKING:
    from emassist.pipeline.watch import Watcher, WatchOptions

# Lazy: the watcher (emassist.pipeline.watch, its scorer imports the pyfunc and so MLflow) and the corrections
# (emassist.data.feedback, pandas) are imported where they are used: the page answers before they are needed.

log = logging.getLogger("emassist.webapp")

STATIC_DIR = Path(__file__).parent / "static"
MAX_RESULTS = 1000  # classified images remembered (for Grad-CAM and the CSV); the oldest are forgotten
MAX_SCANS = 3  # overview images remembered (they can be large)
KEEP_UPLOADS = 200  # original upload bytes kept for corrections (the newest) ...
KEEP_UPLOAD_BYTES = 512 * 2**20  # ... and at most this many bytes of them in all
PREVIEW_SIDE = 384
TOP_K = 3
LIVE_KEEP = 200  # arrivals the Live tab keeps (a browser that connects gets these first)
WATCH_STOP_S = 30.0  # at shutdown, how long the page waits for the watcher to finish the batch in hand
LIVE_THUMB = 96  # thumbnail side, pixels
LIVE_POLL_S = 0.25  # how often an open event stream looks for new arrivals
RETRY_AFTER_S = 2  # Retry-After of a request answered 503 while the model loads


class HttpError(Exception):
    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}  # more keys of the JSON error body (e.g. "status": "loading")


@dataclass
class Result:
    id: str
    filename: str
    width: int
    height: int
    format: str
    gray: np.ndarray  # standardized (what the model saw)
    aspect: float  # width / height of the image after the data-bar crop
    proba: np.ndarray
    databar_rows: int
    created: float
    unfamiliar: bool | None = None  # None: the model ships no familiarity check
    unfamiliar_score: float = 0.0
    sha256: str = ""  # of the upload's bytes, as ingest computes it
    corrected: str = ""  # the label a correction gave it on this page
    scale: ScaleUsed | None = None  # the pixel size a scale-aware model used (None: a model without the input)


@dataclass
class ScanRecord:
    id: str
    filename: str
    gray: np.ndarray  # full resolution
    result: tilescan.TileScan


def reject_status(reason: str) -> int:
    """HTTP status for an ``ImageRejected`` reason."""
    if reason.startswith("decompression bomb"):
        return 413
    if reason.startswith(("not an image", "corrupt image header")):
        return 415
    return 422


#: The results CSV's last columns for a scale-aware model.
SCALE_CSV_COLUMNS = ("pixel_size_nm", "model_pixel_size_nm", "pixel_size_source")


def _scale_cells(scale: ScaleUsed | None) -> list[str]:
    if scale is None:
        return ["", "", "unknown"]
    return ["" if scale.nm is None else f"{scale.nm:.6g}", "" if scale.model_nm is None else f"{scale.model_nm:.6g}",
            scale.source]  # fmt: skip


def _pixel_size_json(scale: ScaleUsed | None) -> dict[str, Any] | None:
    """What the page shows of the pixel size an answer used (None: the model takes none)."""
    if scale is None:
        return None
    r = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in scale.as_dict().items()}
    return {**r, "reason": scale.reason}


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _preview(gray: np.ndarray, aspect: float) -> np.ndarray:
    """The standardized (square) image stretched back to the original aspect ratio, at most PREVIEW_SIDE."""
    from PIL import Image

    if aspect >= 1:
        w, h = PREVIEW_SIDE, max(1, round(PREVIEW_SIDE / aspect))
    else:
        w, h = max(1, round(PREVIEW_SIDE * aspect)), PREVIEW_SIDE
    resample = Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(gray)).resize((w, h), resample))


class LiveHub:
    """The Live tab's arrivals: the watcher (its sink thread) publishes, each event stream reads what is new.

    An event's stream id is ``<epoch>-<seq>``: ``epoch`` is new in every server process, so a browser that
    reconnects after a restart (its EventSource sends the old server's ``Last-Event-ID``) is recognised and gets
    the new server's arrivals from the start instead of waiting for ``seq`` to pass its old number."""

    def __init__(self, keep: int = LIVE_KEEP) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=keep)
        self.seq = 0
        self.epoch = uuid.uuid4().hex[:8]
        self.folder: str | None = None
        self.out: str | None = None
        self.closed = False
        self._lock = threading.Lock()

    def publish(self, record: dict[str, Any], image: np.ndarray | None) -> None:
        """One answered (or rejected, incomplete, gone) file from the watcher → an arrival."""
        thumb = ""
        if image is not None:
            from PIL import Image

            small = Image.fromarray(np.ascontiguousarray(image)).resize((LIVE_THUMB, LIVE_THUMB))
            thumb = _data_url(png_bytes(np.asarray(small)))
        keys = ("time", "path", "relpath", "status", "label", "confidence", "needs_review", "review_reason",
                "unfamiliar", "error", "sha256", "sorted_to")  # fmt: skip
        event = {k: record.get(k) for k in keys}
        event.update(alert=bool(record.get("alert")), thumbnail=thumb)
        with self._lock:
            self.seq += 1
            event["id"] = self.seq
            self.events.append(event)

    def since(self, seq: int) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["id"] > seq]

    def event_id(self, seq: int) -> str:
        """The SSE id of arrival ``seq`` (what the browser sends back as ``Last-Event-ID``)."""
        return f"{self.epoch}-{seq}"

    def resume_after(self, last_event_id: str | None) -> int:
        """The ``seq`` a (re)connecting stream continues after: its ``Last-Event-ID`` when this hub issued it; 0
        (everything kept) for none, a malformed one, or one of another server process (another epoch)."""
        epoch, _, seq = (last_event_id or "").strip().partition("-")
        if epoch != self.epoch or not seq.isdigit():
            return 0
        with self._lock:
            return int(seq) if int(seq) <= self.seq else 0

    def summary(self) -> dict[str, Any]:
        with self._lock:
            recent = list(self.events)
        return {"watching": self.folder, "out": self.out, "events": recent[::-1]}


class WebApp:
    """State and logic behind the routes (kept apart from FastAPI so tests and benchmarks can call it)."""

    def __init__(self, params: Params, backend: Backend) -> None:
        self.params = params
        self.cfg = params.webapp
        self.backend = backend
        self.results: OrderedDict[str, Result] = OrderedDict()
        self.scans: OrderedDict[str, ScanRecord] = OrderedDict()
        self.uploads: OrderedDict[str, bytes] = OrderedDict()  # result id -> original bytes (bounded)
        self._upload_bytes = 0
        self.store: PredictionLog | None = None  # opened by open_log (at the app's start-up)
        self.log_writer: LogWriter | None = None
        self.log_error = ""
        self._lock = threading.Lock()
        self._gradcam: Any = None
        self._gradcam_error = ""
        self.policy = ReviewPolicy.served(backend.config, override=self.cfg.low_confidence)
        self.training_line, self.training_notice = describe_training_data(backend.config)

    # --------------------------------------------------------------------------------------------- prediction log

    def open_log(self) -> None:
        """The store (for corrections) and, with ``monitoring.log_predictions``, the background writer. A store that
        cannot be opened is said once; the page answers anyway."""
        mon = self.params.monitoring
        try:
            self.store = PredictionLog(mon.resolved_db_uri())
        except PredictionLogError as exc:
            self.log_error = str(exc)
            log.warning("prediction log off: %s", exc)
            return
        if mon.log_predictions:
            self.log_writer = LogWriter(self.store, batch_size=mon.batch_size, flush_interval_s=mon.flush_interval_s,
                                        max_pending=mon.max_pending)  # fmt: skip

    def close_log(self) -> None:
        """Flush what is pending (bounded) and stop the writer."""
        if self.log_writer is not None:
            self.log_writer.close()
            if self.log_writer.stats["dropped"]:
                log.warning("prediction log: %d rows dropped in all", self.log_writer.stats["dropped"])
            self.log_writer = None
        if self.store is not None:
            self.store.dispose()

    def _log_answer(self, result: Result, decoded: DecodedImage, out: dict[str, Any]) -> None:
        """One row for the prediction log (never raises: the answer matters more than its log)."""
        if self.log_writer is None:
            return
        try:
            info = self.backend.info
            brightness, contrast = image_stats(result.gray)
            meta = decoded.metadata or {}
            self.log_writer.record(PredictionRow(
                source="web", sha256=result.sha256, origin=result.filename, width=result.width, height=result.height,
                format=result.format, pixel_size_nm=meta.get("pixel_size_nm"), magnification=meta.get("magnification"),
                instrument=meta.get("instrument"), brightness=brightness, contrast=contrast, model_name=info.name,
                model_version=info.version, model_alias=info.alias, label=out["label"], confidence=out["confidence"],
                probabilities=out["probabilities"], needs_review=out["needs_review"], unfamiliar=result.unfamiliar,
                unfamiliar_score=result.unfamiliar_score if result.unfamiliar is not None else None,
            ))  # fmt: skip
        except Exception:
            log.exception("prediction log: the answer to %s could not be logged", result.filename)

    def _keep_upload(self, result_id: str, data: bytes) -> None:
        with self._lock:
            self.uploads[result_id] = data
            self._upload_bytes += len(data)
            while self.uploads and (len(self.uploads) > KEEP_UPLOADS or self._upload_bytes > KEEP_UPLOAD_BYTES):
                _, old = self.uploads.popitem(last=False)
                self._upload_bytes -= len(old)

    # --------------------------------------------------------------------------------------------- helpers

    def info(self) -> dict[str, Any]:
        b = self.backend
        return {
            "model": {**b.info.as_dict(), "label": b.info.label},
            "classes": list(b.classes),
            "review": {
                "threshold": self.policy.threshold,
                "source": self.policy.source,
                "target_accuracy": self.policy.target_accuracy,
                "text": self.policy.describe(),
            },
            "calibrated": b.calibrated,
            "familiarity_checked": b.familiarity_checked,
            "scale_input": b.scale_aware,  # the model takes the pixel size (tags, data bar, else unknown)
            "training_data": {
                **(b.config.get("training_data") or {}),
                "text": self.training_line,
                "notice": self.training_notice,
            },
            "card_url": "/card" if b.info.version else None,
            "limits": {
                "max_upload_bytes": self.cfg.max_upload_bytes,
                "max_pixels": self.cfg.max_pixels,
                "max_files": self.cfg.max_files,
                "max_tiles": self.cfg.max_tiles,
            },
            "preprocessing": b.preprocessor.config(),
            "tile": {"size": self.cfg.tile_size, "stride": self.cfg.tile_stride},
            "formats": ["TIFF", "PNG", "JPEG", "BMP", "GIF", "WEBP"],
        }

    def decode(self, data: bytes, filename: str) -> DecodedImage:
        """The page's own limit on the declared size first (header only), then the model's preprocessor decodes."""
        if not data:
            raise HttpError(400, f"{filename}: empty upload (zero bytes)")
        try:
            header = probe_image(data, max_pixels=self.cfg.max_pixels)
            check_pixels(header.width, header.height, self.cfg.max_pixels)
            return self.backend.preprocessor.decode(data)
        except ImageRejected as exc:
            raise HttpError(reject_status(exc.reason), f"{filename}: {exc.reason}") from exc

    def _remember(self, store: OrderedDict[str, Any], key: str, value: Any, limit: int) -> None:
        with self._lock:
            store[key] = value
            while len(store) > limit:
                store.popitem(last=False)

    # --------------------------------------------------------------------------------------------- classify

    def classify(self, data: bytes, filename: str) -> dict[str, Any]:
        started = time.perf_counter()
        decoded = self.decode(data, filename)
        try:
            gray, bar_rows = self.backend.preprocessor.standardize(decoded.gray)
        except ImageRejected as exc:  # e.g. a featureless (blank) frame
            raise HttpError(reject_status(exc.reason), f"{filename}: {exc.reason}") from exc
        try:
            scale = self.backend.upload_pixel_size(decoded, bar_rows)  # None: a model without the scale input
            if scale is None:
                answer = self.backend.classify_file(data, gray)
            else:
                answer = self.backend.classify_file(data, gray, scale)
        except BackendError as exc:
            raise HttpError(502, str(exc)) from exc
        visible_h = max(1, decoded.height - bar_rows)
        result = Result(
            id=uuid.uuid4().hex[:12],
            filename=filename,
            width=decoded.width,
            height=decoded.height,
            format=decoded.format,
            gray=gray,
            aspect=decoded.width / visible_h,
            proba=np.asarray(answer.proba, dtype=np.float32),
            databar_rows=int(bar_rows),
            created=time.time(),
            unfamiliar=answer.unfamiliar,
            unfamiliar_score=answer.unfamiliar_score,
            sha256=sha256_of(data),
            scale=answer.scale,
        )
        self._remember(self.results, result.id, result, MAX_RESULTS)
        self._keep_upload(result.id, data)
        out = self.result_json(result)
        self._log_answer(result, decoded, out)
        out["preview"] = _data_url(self._png(_preview(gray, result.aspect)))
        out["seconds"] = round(time.perf_counter() - started, 4)
        return out

    def result_json(self, r: Result) -> dict[str, Any]:
        classes = self.backend.classes
        order = np.argsort(-r.proba)
        top = [{"class": classes[int(k)], "p": round(float(r.proba[int(k)]), 6)} for k in order[:TOP_K]]
        confidence = float(r.proba[int(order[0])])
        needs_review, reason = self.policy.decide(confidence, bool(r.unfamiliar))
        return {
            "id": r.id,
            "filename": r.filename,
            "width": r.width,
            "height": r.height,
            "format": r.format,
            "databar_rows": r.databar_rows,
            "label": top[0]["class"],
            "confidence": round(confidence, 6),
            "needs_review": needs_review,
            "review_reason": reason,
            "unfamiliar": r.unfamiliar,
            "unfamiliar_score": round(float(r.unfamiliar_score), 4),
            "top": top,
            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, r.proba, strict=True)},
            "model": self.backend.info.as_dict(),
            "sha256": r.sha256,
            "corrected": r.corrected,
            "pixel_size": _pixel_size_json(r.scale),
        }

    # --------------------------------------------------------------------------------------------- corrections

    def correct(self, body: Any) -> dict[str, Any]:
        """``{"id", "label", "who"}`` → the upload stored under its right class and the correction logged."""
        from emassist.data.feedback import FeedbackError, correct  # lazy: pandas (see the module's imports)

        if not isinstance(body, dict):
            raise HttpError(400, 'send JSON {"id": "<result id>", "label": "<class>", "who": "<your name>"}')
        result_id, label, who = body.get("id"), body.get("label"), body.get("who") or ""
        if not isinstance(result_id, str) or not result_id:
            raise HttpError(400, "id: the result's id is missing")
        if not isinstance(label, str) or not label:
            raise HttpError(400, "label: the right class is missing")
        if not isinstance(who, str) or len(who) > 128:
            raise HttpError(400, "who: a name of at most 128 characters")
        r = self.results.get(result_id)
        if r is None:
            raise HttpError(404, f"no classified image with id {result_id!r} (the server may have restarted)")
        classes = self.backend.classes
        if label not in classes:
            raise HttpError(400, f"unknown class {label!r} (the model knows: {', '.join(classes)})")
        data = self.uploads.get(result_id)
        if data is None:
            raise HttpError(410, f"{r.filename}: its bytes are no longer kept (only the last {KEEP_UPLOADS} uploads "
                                 "are); upload it again to correct it")  # fmt: skip
        if self.store is None:
            raise HttpError(503, f"corrections are off: {self.log_error or 'the prediction log is not open'}")
        top = self.result_json(r)["label"]
        try:
            done = correct(
                self.store, r.sha256, label, classes=classes, feedback_dir=self.params.monitoring.feedback_dir,
                who=who.strip(), image_bytes=data, model_version=self.backend.info.version, old_label=top,
            )  # fmt: skip
        except FeedbackError as exc:
            raise HttpError(400, f"{r.filename}: {exc}") from exc
        except (PredictionLogError, OSError) as exc:
            log.warning("correction of %s not stored: %s", r.filename, exc)
            raise HttpError(503, f"{r.filename}: the correction could not be stored: {exc}") from exc
        if done.status != "conflicting":
            r.corrected = label
        return {"id": r.id, "sha256": done.sha256, "label": label, "status": done.status, "labels": list(done.labels),
                "path": done.path.as_posix(), "message": done.message()}  # fmt: skip

    @staticmethod
    def _png(image: np.ndarray) -> bytes:
        return png_bytes(image)

    # --------------------------------------------------------------------------------------------- model card

    def card(self) -> str:
        """The served version's model card (markdown): its registry description, else generated from its run."""
        from emassist.model.card import card_markdown  # lazy: the card pulls in MLflow's client
        from emassist.model.tracking import tracking_client

        info = self.backend.info
        if not info.version:
            raise HttpError(404, f"{info.uri} is not a registered version: it has no model card")
        try:
            return card_markdown(tracking_client(self.params), self.params.mlflow.registered_model, info.version)
        except Exception as exc:  # the registry is down or the version went away: say so, keep serving
            log.exception("cannot build the model card")
            raise HttpError(502, f"cannot read the model card of version {info.version}: {exc}") from exc

    # --------------------------------------------------------------------------------------------- Grad-CAM

    def gradcam(self, result_id: str, class_name: str | None) -> dict[str, Any]:
        r = self.results.get(result_id)
        if r is None:
            raise HttpError(404, f"no classified image with id {result_id!r} (the server may have restarted)")
        classes = self.backend.classes
        if class_name and class_name not in classes:
            raise HttpError(400, f"unknown class {class_name!r} (the model knows: {', '.join(classes)})")
        with self._lock:
            if self._gradcam is None and not self._gradcam_error:
                try:
                    model, size = self.backend.keras_model()
                    self._gradcam = GradCam(model, size)
                except (BackendError, GradCamError) as exc:
                    self._gradcam_error = str(exc)
            cam = self._gradcam
        if cam is None:
            raise HttpError(503, f"Grad-CAM is not available: {self._gradcam_error}")
        k = classes.index(class_name) if class_name else int(np.argmax(r.proba))
        with self._lock:  # TensorFlow's tape on two cores: one at a time
            heat, k = cam(r.gray, k, r.scale.features() if r.scale is not None else None)
        image = overlay(_preview(r.gray, r.aspect), heat)
        return {"id": r.id, "class": classes[k], "layer": cam.layer_name, "overlay": _data_url(self._png(image))}

    # --------------------------------------------------------------------------------------------- CSV

    def results_csv(self, ids: list[str] | None) -> str:
        classes = self.backend.classes
        with self._lock:
            chosen = list(self.results.values()) if not ids else [self.results[i] for i in ids if i in self.results]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        info = self.backend.info
        writer.writerow(["filename", "label", "confidence", "needs_review", "review_reason", "unfamiliar",
                         "unfamiliar_score", "top2", "top3", *classes,
                         "model", "model_version", "model_alias", "width", "height", "format",
                         *(SCALE_CSV_COLUMNS if self.backend.scale_aware else ())])  # fmt: skip
        for r in chosen:
            j = self.result_json(r)
            tops = [t["class"] for t in j["top"]] + ["", ""]
            unfamiliar = "" if j["unfamiliar"] is None else j["unfamiliar"]
            writer.writerow(
                [
                    r.filename,
                    j["label"],
                    f"{j['confidence']:.6f}",
                    j["needs_review"],
                    j["review_reason"],
                    unfamiliar,
                    f"{j['unfamiliar_score']:.4f}",
                    tops[1],
                    tops[2],
                ]
                + [f"{float(p):.6f}" for p in r.proba]
                + [info.name, info.version, info.alias, r.width, r.height, r.format]
                + (_scale_cells(r.scale) if self.backend.scale_aware else [])
            )
        return buf.getvalue()

    # --------------------------------------------------------------------------------------------- tile scan

    def scan(self, data: bytes, filename: str, class_name: str, tile: int, stride: int) -> dict[str, Any]:
        classes = self.backend.classes
        if class_name not in classes:
            raise HttpError(400, f"unknown class {class_name!r} (the model knows: {', '.join(classes)})")
        try:
            tilescan.check_options(tile, stride)
        except tilescan.ScanError as exc:
            raise HttpError(400, str(exc)) from exc
        decoded = self.decode(data, filename)
        try:
            scale = None
            if self.backend.scale_aware:  # the full image's pixel size; each tile gets it scaled to its model input
                scale = self.backend.read_pixel_size(decoded, self.backend.preprocessor.crop(decoded.gray)[1])
            result = tilescan.scan(
                decoded.gray,
                self.backend.probabilities,
                classes,
                tile=tile,
                stride=stride,
                preprocessor=self.backend.preprocessor,
                batch_size=self.cfg.tile_batch,
                max_tiles=self.cfg.max_tiles,
                scale=scale,
            )
        except ImageRejected as exc:  # a featureless overview
            raise HttpError(reject_status(exc.reason), f"{filename}: {exc.reason}") from exc
        except tilescan.ScanError as exc:
            raise HttpError(400, str(exc)) from exc
        except BackendError as exc:
            raise HttpError(502, str(exc)) from exc
        record = ScanRecord(uuid.uuid4().hex[:12], filename, decoded.gray, result)
        self._remember(self.scans, record.id, record, MAX_SCANS)
        return self.scan_json(record, class_name)

    def _scan(self, scan_id: str) -> ScanRecord:
        record = self.scans.get(scan_id)
        if record is None:
            raise HttpError(404, f"no tile scan with id {scan_id!r} (only the last {MAX_SCANS} are kept)")
        return record

    def scan_json(self, record: ScanRecord, class_name: str) -> dict[str, Any]:
        res = record.result
        try:
            k = res.class_index(class_name)
        except tilescan.ScanError as exc:
            raise HttpError(400, str(exc)) from exc
        grid = res.scores[:, :, k]
        peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
        image = tilescan.heatmap_overlay(record.gray, res, class_name)
        return {
            "id": record.id,
            "filename": record.filename,
            "class": class_name,
            "tile": res.tile,
            "stride": res.stride,
            "rows": len(res.ys),
            "cols": len(res.xs),
            "n_tiles": res.n_tiles,
            "width": res.width,
            "height": res.height,
            "databar_rows": res.databar_rows,
            "seconds": round(res.seconds, 3),
            "grid": [[round(float(v), 5) for v in row] for row in grid],
            "max": round(float(grid.max()), 6),
            "mean": round(float(grid.mean()), 6),
            "peak": {"row": int(peak[0]), "col": int(peak[1]), "x": res.xs[int(peak[1])], "y": res.ys[int(peak[0])]},
            "heatmap": _data_url(self._png(image)),
            "model": self.backend.info.as_dict(),
            "pixel_size": None
            if not res.pixel_size_source
            else {
                "pixel_size_nm": res.pixel_size_nm,
                "model_pixel_size_nm": res.tile_pixel_size_nm,
                "pixel_size_source": res.pixel_size_source,
            },
        }


# ------------------------------------------------------------------------------------------------ start-up


class ModelSlot:
    """The page's model as it starts: "loading" (the backend loads on its own thread), then "ok" with the
    :class:`WebApp` around it, or "error" with the reason. Requests that need the model ask :meth:`webapp`.

    ``on_ready``: called (on the loading thread) with the WebApp once it is ready, e.g. to start the watcher; what it
    returns is kept for ``on_close``, called at shutdown."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.status = "loading"
        self.error = ""
        self.not_found: BackendNotFound | None = None
        self.app: WebApp | None = None
        self.started = time.monotonic()
        self.seconds: float | None = None  # the load's, once done
        self.closed = False
        self.on_start: Any = None  # called as the server starts (serve: the background load)
        self.on_ready: Any = None
        self.on_close: Any = None
        self._extra: Any = None
        self._lock = threading.Lock()

    def ready(self, backend: Backend) -> None:
        """The backend is loaded: the page's state around it, its prediction log, then ``on_ready``."""
        try:
            app = WebApp(self.params, backend)
        except Exception as exc:  # e.g. a serving config the page cannot read: say so, keep the page up
            log.exception("the model loaded but the page cannot use it")
            self.failed(exc)
            return
        with self._lock:
            if self.closed:  # the server stopped while the model loaded
                return
            app.open_log()
            self._extra = self.on_ready(app) if self.on_ready is not None else None
            self.app, self.status = app, "ok"
            self.seconds = time.monotonic() - self.started
        log.warning("model: %s, ready after %.1f s", backend.info.label, self.seconds)

    def failed(self, exc: BaseException) -> None:
        """The load failed: the page stays up and says why (health, info and every model request)."""
        message = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.status, self.error = "error", message or type(exc).__name__
            self.seconds = time.monotonic() - self.started
            if isinstance(exc, BackendNotFound):
                self.not_found = exc
        log.warning("the model could not be loaded: %s", self.error)

    def close(self) -> None:
        """At shutdown: the watcher (``on_close``) and the prediction log of a ready page."""
        with self._lock:
            self.closed = True
            app, extra = self.app, self._extra
        if app is None:
            return
        if self.on_close is not None and extra is not None:
            self.on_close(extra)
        app.close_log()

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.status == "ok":
            return 200, {"status": "ok"}
        if self.status == "loading":
            return 503, {"status": "loading", "seconds": round(time.monotonic() - self.started, 1)}
        return 503, {"status": "error", "error": self.error}

    def webapp(self) -> WebApp:
        """The ready page's state; 503 with a message (and Retry-After while loading) before that."""
        app = self.app
        if app is not None:
            return app
        if self.status == "error":
            raise HttpError(503, f"the model could not be loaded: {self.error}", extra={"status": "error"})
        waited = time.monotonic() - self.started
        raise HttpError(503, f"the model is still loading ({waited:.0f} s so far); try again in a few seconds",
                        headers={"Retry-After": str(RETRY_AFTER_S)}, extra={"status": "loading"})  # fmt: skip


# ------------------------------------------------------------------------------------------------ FastAPI


async def read_body(request: Request, limit: int, filename: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"{filename}: file too large ({int(declared):,} bytes; the limit is {limit:,})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"{filename}: file too large (over {limit:,} bytes; the limit is {limit:,})")
        chunks.append(chunk)
    return b"".join(chunks)


def _filename(value: str | None) -> str:
    name = Path(str(value or "upload")).name.strip() or "upload"
    return "".join(ch for ch in name if ch.isprintable() and ch not in '"\\')[:200]


def create_app(params: Params, backend: Backend | ModelSlot, *, watch: WatchOptions | None = None,
               should_exit: Any = None) -> FastAPI:  # fmt: skip
    """The FastAPI app around ``backend``: a loaded :class:`Backend` (ready at once), or a :class:`ModelSlot` that
    a :class:`~emassist.serve.backend.BackendLoader` fills while the page already answers (:func:`serve`).

    ``watch``: also run the folder watcher (``emassist web --watch DIR``) with the same model, its arrivals on the
    Live tab (it starts when the model is ready). ``should_exit``: a callable saying that the server is stopping
    (open event streams end then)."""
    hub = LiveHub()
    slot = backend if isinstance(backend, ModelSlot) else ModelSlot(params)
    if watch is not None:
        slot.on_ready = lambda app: _start_watch(params, app.backend, watch, hub)
        slot.on_close = lambda live: _stop_watch(*live)
    if isinstance(backend, Backend):
        slot.ready(backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if slot.on_start is not None:
            slot.on_start()
        try:
            yield
        finally:
            hub.closed = True
            slot.close()

    app = FastAPI(title="Electron Microscope Assistant", docs_url="/api/docs", redoc_url=None, lifespan=lifespan)
    app.state.slot = slot
    app.state.live = hub

    def state() -> WebApp:
        return slot.webapp()

    @app.exception_handler(HttpError)
    async def http_error(request: Request, exc: HttpError) -> JSONResponse:
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> JSONResponse:
        status, body = slot.health()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if body["status"] == "loading" else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/card", include_in_schema=False)
    def card() -> Response:
        return Response(state().card(), media_type="text/plain; charset=utf-8")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return state().info()

    @app.post("/api/classify")
    async def classify(request: Request, filename: str | None = None) -> JSONResponse:
        web = state()  # before reading the body: a page still loading answers at once
        name = _filename(filename)
        data = await read_body(request, params.webapp.max_upload_bytes, name)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(web.classify, data, name))

    @app.get("/api/gradcam/{result_id}")
    def gradcam(result_id: str, request: Request) -> dict[str, Any]:
        return state().gradcam(result_id, request.query_params.get("class") or None)

    @app.post("/api/correct")
    async def correct_result(request: Request) -> JSONResponse:
        web = state()
        raw = await read_body(request, 64 * 1024, "correction")
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise HttpError(400, f"the body is not JSON: {exc}") from exc
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(web.correct, body))

    @app.get("/api/results.csv")
    def results_csv(ids: str | None = None) -> Response:
        chosen = [i for i in (ids or "").split(",") if i]
        text = state().results_csv(chosen or None)
        headers = {"Content-Disposition": 'attachment; filename="sem-predictions.csv"'}
        return Response(text, media_type="text/csv", headers=headers)

    @app.post("/api/scan")
    async def scan(request: Request, filename: str | None = None) -> JSONResponse:
        web = state()
        name = _filename(filename)
        q = request.query_params
        class_name = q.get("class") or ""
        tile = _int_param(q.get("tile"), params.webapp.tile_size, "tile")
        stride = _int_param(q.get("stride"), params.webapp.tile_stride, "stride")
        data = await read_body(request, params.webapp.max_upload_bytes, name)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(web.scan, data, name, class_name, tile, stride))

    @app.get("/api/scan/{scan_id}/heatmap")
    def scan_heatmap(scan_id: str, request: Request) -> dict[str, Any]:
        web = state()
        return web.scan_json(web._scan(scan_id), request.query_params.get("class") or "")

    @app.get("/api/scan/{scan_id}/tiles.csv")
    def scan_csv(scan_id: str) -> Response:
        record = state()._scan(scan_id)
        stem = Path(record.filename).stem or "scan"
        headers = {"Content-Disposition": f'attachment; filename="{stem}-tiles.csv"'}
        return Response(record.result.csv_text(), media_type="text/csv", headers=headers)

    @app.get("/api/live")
    def live() -> dict[str, Any]:
        state()  # the watcher starts with the model
        return hub.summary()

    @app.get("/api/live/events", response_class=EventSourceResponse)
    async def live_events(last_event_id: str | None = Header(None)) -> AsyncIterator[ServerSentEvent]:
        import asyncio

        state()
        seq = hub.resume_after(last_event_id)  # another server's id (a restart): from the start
        while not hub.closed and not (should_exit is not None and should_exit()):
            for event in hub.since(seq):
                seq = event["id"]
                yield ServerSentEvent(data=event, event="arrival", id=hub.event_id(seq))
            await asyncio.sleep(LIVE_POLL_S)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _start_watch(params: Params, backend: Backend, options: WatchOptions, hub: LiveHub) -> tuple[Any, Any, Any]:
    """The watcher in this process (its own threads), publishing to the Live tab; its answers are logged as source
    ``watch`` by a writer of its own."""
    from emassist.pipeline.watch import Watcher  # lazy: see the module's imports
    from emassist.pipeline.watch_scorer import Scorer
    from emassist.serve.predlog_hooks import open_writer

    writer = None
    if options.log_predictions and params.monitoring.log_predictions:
        writer, why = open_writer(params.monitoring.resolved_db_uri(), params.monitoring)
        if writer is None:
            log.warning("watch: prediction log off: %s", why)

    def say(line: str) -> None:
        log.warning("watch: %s", line)

    watcher = Watcher(options, params, Scorer(backend), log_writer=writer, say=say, listeners=[hub.publish])
    watcher.start()
    hub.folder, hub.out = str(watcher.root), str(watcher.out)
    log.warning("watching %s; results in %s", watcher.root, watcher.out)
    thread = threading.Thread(target=watcher.run, name="watch-supervisor", daemon=True)
    thread.start()
    return watcher, thread, writer


def _stop_watch(watcher: Watcher, thread: threading.Thread, writer: LogWriter | None,
                timeout_s: float = WATCH_STOP_S) -> bool:  # fmt: skip
    """Finish the batch in hand, close the watcher's files, then its log writer; True when it stopped in time.

    The writer is closed only once the watcher's thread has ended (its sink may still log the batch in hand): a
    watcher still busy after ``timeout_s`` keeps it open, and the server exits without waiting for it (results and
    state are written batch by batch; the next start recovers what the batch in hand had written)."""
    watcher.stop()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("watch: still finishing a batch after %g s; leaving without waiting for it", timeout_s)
        return False
    if writer is not None:
        writer.close()
    return True


def _int_param(value: str | None, default: int, name: str) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise HttpError(400, f"{name}: must be a whole number of pixels, got {value!r}") from exc


@contextlib.contextmanager
def private_tempdir(base: str | None) -> Iterator[Path]:
    """A private folder under ``base`` (None: the system's) that becomes this process's temporary folder (the
    model MLflow downloads, anything a library spools) and is removed on the way out."""
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    private = tempfile.mkdtemp(prefix="emassist-web-", dir=base)
    previous = tempfile.tempdir
    tempfile.tempdir = private
    try:
        yield Path(private)
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(private, ignore_errors=True)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def serve(
    params: Params,
    host: str,
    port: int,
    *,
    model_uri: str | None = None,
    endpoint_url: str | None = None,
    watch: WatchOptions | None = None,
) -> None:
    """Serve the page until stopped, loading the model (``webapp.source``, or ``model_uri`` / ``endpoint_url``) on a
    thread of its own once the server runs; ``watch``: with the folder watcher inside (the Live tab).

    Raises :class:`BackendNotFound` when there is nothing to load (no such model in the registry, no such file, no
    model server at the endpoint): the server stops then. A model that is there but cannot be loaded leaves the page
    up, saying why."""
    import uvicorn

    # uvicorn re-raises SIGTERM after its graceful shutdown; as SystemExit it lets the temporary folder go too.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with private_tempdir(params.webapp.temp_dir):
        slot = ModelSlot(params)
        loader = BackendLoader(params, model_uri=model_uri, endpoint_url=endpoint_url)
        server: Any = None

        def not_found_stops(exc: BaseException) -> None:
            slot.failed(exc)
            if isinstance(exc, BackendNotFound) and server is not None:
                server.should_exit = True  # nothing to serve: stop, and the command says why (exit 1)

        app = create_app(params, slot, watch=watch, should_exit=lambda: bool(server and server.should_exit))

        slot.on_start = lambda: loader.start(slot.ready, not_found_stops)  # as the server starts: beside it
        log.warning("page at http://%s:%d/ (the model loads in the background)", host, port)
        # uvicorn.Server rather than uvicorn.run: the Live tab's open event streams end when it starts stopping
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False))
        server.run()
        if slot.not_found is not None:
            raise slot.not_found
        if not server.started:  # as uvicorn.run: a port in use, a failed start-up
            raise SystemExit(3)
