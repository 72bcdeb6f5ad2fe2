"""Where the web page (and ``emassist scan``) gets its predictions: the registry's model in-process, or a running
``mlflow models serve`` endpoint (``webapp.source``).

Every backend has the served model's own :class:`~emassist.data.preprocess.Preprocessor` (``backend.preprocessor``:
cache size, data-bar crop, decode limits, input size): in-process it is the loaded ``SemClassifier``'s; for an
endpoint it is built from the serving config registered with the version the alias resolves to (the artifact
``serving_config.json``), never from the page's params. Through the endpoint
(:class:`~emassist.serve.client.SemClient`), an uploaded file goes as it is and the server preprocesses it;
standardized images (tiles) go as PNGs with the inference parameter ``standardized``, so the server only resizes
them and local and endpoint scans agree.

A scale-aware model (:mod:`emassist.model.scale`; ``scale_aware``): :meth:`Backend.read_pixel_size` reads a decoded
file's pixel size as the pyfunc does (tags, else the data bar, else unknown); scores take the ``"scale"`` input
(``scale=``); an endpoint gets it as the ``pixel_size_nm`` column of the PNGs sent (nm per pixel of the PNG), and
reads an uploaded file's own pixel size itself (:meth:`Backend.upload_pixel_size` is then None).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emassist.config.settings import Params
from emassist.data.preprocess import Preprocessor
from emassist.model.scale import SCALE_SOURCES, ScaleUsed, scale_batch
from emassist.model.tracking import tracking_client
from emassist.serve.drawing import png_bytes

if TYPE_CHECKING:
    import pandas as pd

    from emassist.serve.client import SemClient

# Lazy (inside the functions that need them): pandas, requests and the scoring client (the endpoint backend only),
# emassist.serve.predict (pulls in MLflow: seconds) and the prediction-log hooks (SQLAlchemy). `emassist web` imports
# this module before its page answers; the model loads on a thread of its own afterwards (BackendLoader).

log = logging.getLogger("emassist.webapp")

URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # models:/, runs:/, s3://, file:/ ... (else a local path)

#: TEST HOOK, read only by :class:`BackendLoader`: while the file this names does not exist, the background load
#: waits before it starts (the start-up tests hold the model "loading" deterministically). Unset: no wait at all.
ENV_TEST_HOLD_LOAD = "EMASSIST_TEST_HOLD_LOAD"


class BackendError(RuntimeError):
    """The model cannot be loaded or reached; the message says which and why."""


class BackendNotFound(BackendError):
    """There is nothing to load: the registry has no such model, alias or version, no such file, or no model server
    answers at the endpoint. ``emassist web`` exits on it (status 1), as it always did; a model that is there but
    fails to load leaves the page up, saying why."""


@dataclass
class ModelInfo:
    name: str  # registered model name (or the file/URI for a model given by hand)
    version: str  # registry version, "" when unknown
    alias: str  # the alias that resolved to it, "" when none
    source: str  # "registry" | "endpoint" | "file"
    uri: str  # what was loaded or called
    run_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)

    @property
    def label(self) -> str:
        version = f" v{self.version}" if self.version else ""
        alias = f" @{self.alias}" if self.alias else ""
        return f"{self.name}{version}{alias} ({self.source})"


@dataclass(frozen=True)
class Answer:
    """One image's answer: calibrated probabilities and whether the image is like the training data."""

    proba: np.ndarray  # [n_classes]
    unfamiliar: bool | None  # None: the model ships no familiarity check (registered before it existed)
    unfamiliar_score: float  # familiarity distance over its threshold (above 1: unfamiliar); 0 when unchecked
    scale: ScaleUsed | None = None  # the pixel size a scale-aware model used; None: a model without the input


class Backend:
    """What the page needs from a model."""

    info: ModelInfo
    classes: list[str]
    preprocessor: Preprocessor  # the served model's own
    config: dict[str, Any]  # the served model's serving config (review threshold, temperature, training data)

    def probabilities(self, gray: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Standardized uint8 images ``[B, S, S]`` → calibrated probabilities ``[B, n_classes]`` (``scale``: float32
        ``[B, 2]``, the scale input of a scale-aware model; None: unknown)."""
        raise NotImplementedError

    def classify_file(self, data: bytes, gray: np.ndarray, scale: ScaleUsed | None = None) -> Answer:
        """One uploaded image (its file bytes, its standardized image and, for a scale-aware model, the pixel size
        :meth:`upload_pixel_size` read) → its :class:`Answer`."""
        used = [scale] if scale is not None else None
        proba = self.probabilities(gray[None], scale_batch(used) if used and self.scale_aware else None)
        return Answer(proba[0], None, 0.0, scale)

    @property
    def scale_aware(self) -> bool:
        """Whether the model takes the pixel size (its serving config's ``scale_input``)."""
        return bool(self.config.get("scale_input", False))

    def read_pixel_size(self, decoded: Any, bar_rows: int) -> ScaleUsed | None:
        """The pixel size a scale-aware model gets for a decoded file whose data bar (``bar_rows`` rows) the
        preprocessor cropped, read as the pyfunc reads it; None for a model without the scale input."""
        if not self.scale_aware:
            return None
        reader = getattr(self, "_scale_reader", None)
        if reader is None:
            from emassist.data.scalebar import engine_available  # lazy: the OCR engine
            from emassist.serve.pyfunc import SemClassifier  # lazy: MLflow

            reader = SemClassifier()
            reader.configure(self.config)
            reader.bar_not_read = engine_available()
            self._scale_reader = reader
        return reader.scale_of(decoded, bar_rows, False)

    def upload_pixel_size(self, decoded: Any, bar_rows: int) -> ScaleUsed | None:
        """What :meth:`classify_file` is given for an upload: :meth:`read_pixel_size` (an endpoint reads it itself)."""
        return self.read_pixel_size(decoded, bar_rows)

    @property
    def familiarity_checked(self) -> bool:
        """Whether answers carry the unfamiliar flag (the model ships the familiarity check)."""
        return bool(self.config.get("familiarity"))

    @property
    def calibrated(self) -> bool:
        """Whether the served probabilities are temperature-calibrated (a model registered before calibration:
        not)."""
        return "temperature" in self.config

    def keras_model(self) -> tuple[Any, int]:
        """(the Keras model, its input size) for Grad-CAM; raises BackendError where there is none."""
        raise BackendError("this model source has no Keras model for Grad-CAM")


class LocalBackend(Backend):
    """A ``SemClassifier`` loaded in this process (from the registry, a model folder or a ``.keras`` file)."""

    def __init__(self, model: Any, info: ModelInfo) -> None:
        self.model = model
        self.info = info
        self.classes = list(model.classes)
        self.preprocessor = model.preprocessor
        self.config = dict(getattr(model, "config", {}) or {})
        self._lock = threading.Lock()  # one forward pass at a time: two cores, one model

    def probabilities(self, gray: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        batch = np.asarray(gray, dtype=np.uint8)
        with self._lock:
            proba = self.model.probabilities(batch, scale) if self.scale_aware else self.model.probabilities(batch)
        return np.asarray(proba, dtype=np.float32)

    def score(self, gray: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Standardized uint8 ``[B, S, S]`` → (calibrated probabilities, unfamiliar scores), one forward pass at a
        time (the page and a watcher inside it share the model); ``scale``: as for :meth:`probabilities`."""
        batch = np.asarray(gray, dtype=np.uint8)
        with self._lock:
            return self.model.score(batch, scale) if self.scale_aware else self.model.score(batch)

    @property
    def familiarity_checked(self) -> bool:
        return getattr(self.model, "familiarity", None) is not None

    @property
    def scale_aware(self) -> bool:
        return bool(getattr(self.model, "scale_aware", False))

    def read_pixel_size(self, decoded: Any, bar_rows: int) -> ScaleUsed | None:
        return self.model.scale_of(decoded, bar_rows, False) if self.scale_aware else None

    def classify_file(self, data: bytes, gray: np.ndarray, scale: ScaleUsed | None = None) -> Answer:
        batch = np.asarray(gray, dtype=np.uint8)[None]
        with self._lock:
            if self.scale_aware:
                proba, scores = self.model.score(batch, scale_batch([scale]))
            else:
                proba, scores = self.model.score(batch)
        score = float(scores[0])
        checked = score > 1.0 if self.familiarity_checked else None
        return Answer(np.asarray(proba[0], dtype=np.float32), checked, score, scale if self.scale_aware else None)

    def keras_model(self) -> tuple[Any, int]:
        return self.model.model, int(self.preprocessor.image_size or 0)


class EndpointBackend(Backend):
    """A running ``mlflow models serve`` of the SEM pyfunc, with the served version's registered serving config."""

    def __init__(self, url: str, params: Params, info: ModelInfo, timeout: float, config: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.info = info
        self.params = params
        from emassist.serve.client import SemClient  # lazy: pandas and requests

        self.client: SemClient = SemClient(self.url, timeout=timeout)
        self.classes = [str(c) for c in config["classes"]]
        self.preprocessor = Preprocessor.from_config(config)
        self.config = dict(config)
        self._keras: tuple[Any, int] | None = None

    def _frame(self, blobs: list[bytes], *, standardized: bool, pixel_sizes: list[float] | None = None) -> pd.DataFrame:
        import requests

        from emassist.serve.client import ServingError

        try:
            return self.client.predict_bytes(blobs, standardized=standardized, pixel_sizes=pixel_sizes)
        except ServingError as exc:
            raise BackendError(f"model endpoint answered {exc.status}: {exc.message[:300]}") from exc
        except requests.RequestException as exc:
            raise BackendError(f"model endpoint {self.url} unreachable: {type(exc).__name__}") from exc

    def _call(self, blobs: list[bytes], *, standardized: bool, pixel_sizes: list[float] | None = None) -> np.ndarray:
        return self._probabilities(self._frame(blobs, standardized=standardized, pixel_sizes=pixel_sizes), len(blobs))

    def _probabilities(self, frame: pd.DataFrame, n: int) -> np.ndarray:
        import pandas as pd

        missing = [c for c in self.classes if c not in frame.columns]
        if missing or len(frame) != n:
            raise BackendError(
                f"model endpoint {self.url} answered {len(frame)} rows with columns {list(frame.columns)[:12]}, "
                f"not {n} rows of the registered classes {self.classes}: is it serving {self.info.label}?"
            )
        errors = [str(e) for e in frame.get("error", pd.Series([""] * n)).fillna("") if str(e)]
        if errors:
            raise BackendError("model endpoint refused an image: " + "; ".join(errors)[:300])
        return frame[self.classes].to_numpy(dtype=np.float32)

    def probabilities(self, gray: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Standardized images go as PNGs marked ``standardized``: the server only resizes them (no data bar). A
        scale-aware model gets ``scale`` as the ``pixel_size_nm`` of each PNG (when every size is known)."""
        batch = np.asarray(gray, dtype=np.uint8)
        sizes = None
        if self.scale_aware and scale is not None and len(batch) and bool(np.all(np.asarray(scale)[:, 1] == 1)):
            # the model-input pixel size back to the PNG's own: the server multiplies by its width / image_size
            image_size, width = float(self.preprocessor.image_size or 0), float(batch.shape[2])
            sizes = [float(10.0 ** float(v)) * image_size / width for v in np.asarray(scale)[:, 0]]
        return self._call([png_bytes(g) for g in batch], standardized=True, pixel_sizes=sizes)

    def upload_pixel_size(self, decoded: Any, bar_rows: int) -> ScaleUsed | None:
        return None  # the server reads the uploaded file's own tags and bar

    def classify_file(self, data: bytes, gray: np.ndarray, scale: ScaleUsed | None = None) -> Answer:
        frame = self._frame([data], standardized=False)
        proba = self._probabilities(frame, 1)[0]
        used = _served_scale(frame) if self.scale_aware else None
        # the registered serving config says whether the model ships the familiarity check (older ones do not)
        if not self.config.get("familiarity") or "unfamiliar_score" not in frame.columns:
            return Answer(proba, None, 0.0, used)
        return Answer(proba, bool(frame["unfamiliar"].iloc[0]), float(frame["unfamiliar_score"].iloc[0]), used)

    def keras_model(self) -> tuple[Any, int]:
        """The registry's model for the same alias, loaded on first use (the endpoint serves no gradients)."""
        if self._keras is None:
            try:
                local = load_registry(self.params)
            except BackendError as exc:
                raise BackendError(f"Grad-CAM needs the Keras model from the registry: {exc}") from exc
            self._keras = local.keras_model()
        return self._keras


def _served_scale(frame: pd.DataFrame) -> ScaleUsed | None:
    """The pixel size an endpoint's answer (its first row) says it used; None when it says none."""
    if "pixel_size_source" not in frame.columns:
        return None

    def number(column: str) -> float | None:
        try:
            value = float(frame[column].iloc[0])
        except (KeyError, TypeError, ValueError):
            return None
        return value if np.isfinite(value) else None

    source = str(frame["pixel_size_source"].iloc[0])
    return ScaleUsed(number("pixel_size_nm"), number("model_pixel_size_nm"),
                     source if source in SCALE_SOURCES else "unknown")  # fmt: skip


# ------------------------------------------------------------------------------------------------ loading


def resolve_alias(params: Params) -> tuple[str, str]:
    """(version, run_id) the configured alias points at; raises BackendError."""
    from mlflow.exceptions import MlflowException

    name, alias = params.mlflow.registered_model, params.webapp.alias
    try:
        mv = tracking_client(params).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise BackendNotFound(
            f"no model {name}@{alias} in the registry at {params.mlflow.resolved_tracking_uri()} "
            f"(run `dvc repro` or `emassist promote --version N`): {exc.message.splitlines()[0]}"
        ) from exc
    return str(mv.version), str(mv.run_id or "")


def _load_classifier(uri: str, params: Params) -> Any:
    """The SEM classifier pyfunc at ``uri`` (``params`` give a ``.keras`` file its classes and preprocessing);
    BackendError when it cannot be loaded or is another kind of model."""
    if not URI_SCHEME.match(uri) and not Path(uri).exists():
        raise BackendNotFound(f"cannot load {uri}: no such file or folder")
    from mlflow.exceptions import MlflowException

    from emassist.serve.predict import load_predictor  # lazy: MLflow, and TensorFlow when the model loads

    try:
        model = load_predictor(uri, params)
    except MlflowException as exc:
        kind = BackendNotFound if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else BackendError
        raise kind(f"cannot load {uri}: {exc.message.splitlines()[0]}") from exc
    if not hasattr(model, "probabilities"):
        raise BackendError(f"{uri} is not the SEM classifier pyfunc (emassist/serve/pyfunc.py)")
    return model


def load_registry(params: Params) -> LocalBackend:
    """``models:/<mlflow.registered_model>/<version of webapp.alias>``, loaded in-process."""
    name, alias = params.mlflow.registered_model, params.webapp.alias
    version, run_id = resolve_alias(params)
    uri = f"models:/{name}/{version}"
    return LocalBackend(_load_classifier(uri, params), ModelInfo(name, version, alias, "registry", uri, run_id))


def load_model_uri(uri: str, params: Params) -> LocalBackend:
    """A model named by hand: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a model folder or a ``.keras`` file."""
    from emassist.serve.predlog_hooks import ModelIdentity  # lazy: the prediction log's SQLAlchemy

    client = tracking_client(params)  # models:/ URIs resolve against the configured tracking URI
    model = _load_classifier(uri, params)
    who = ModelIdentity.from_uri(uri, client)
    source = "registry" if who.alias or who.version else "file"
    return LocalBackend(model, ModelInfo(who.name, who.version, who.alias, source, uri))


def served_config(params: Params, version: str) -> dict[str, Any]:
    """The serving config (classes + preprocessor settings) registered with ``version``; raises BackendError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = params.mlflow.registered_model
    uri = f"models:/{name}/{version}/artifacts/serving_config.json"
    tracking_client(params)
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (MlflowException, OSError, ValueError) as exc:
        message = exc.message.splitlines()[0] if isinstance(exc, MlflowException) else str(exc)
        raise BackendError(f"cannot read the served model's serving config {uri}: {message}") from exc
    try:
        Preprocessor.from_config(config)
        if not isinstance(config["classes"], list) or not config["classes"]:
            raise ValueError("no classes")
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendError(f"{uri} is not a serving config of the SEM classifier: {exc!r}") from exc
    return dict(config)


def load_endpoint(params: Params, url: str | None = None) -> EndpointBackend:
    """A running ``mlflow models serve``; its classes and preprocessing are those registered with the version the
    alias points at (the registry must be reachable)."""
    from emassist.serve.client import SemClient  # lazy: pandas and requests

    url = (url or params.webapp.endpoint_url).rstrip("/")
    with SemClient(url, timeout=5) as probe:
        ok = probe.ping()
    if not ok:
        raise BackendNotFound(f"no model server answers at {url}/ping (start `mlflow models serve ...` first)")
    version, run_id = resolve_alias(params)
    config = served_config(params, version)
    info = ModelInfo(params.mlflow.registered_model, version, params.webapp.alias, "endpoint", url, run_id)
    return EndpointBackend(url, params, info, params.webapp.endpoint_timeout_s, config)


def load_backend(params: Params, *, model_uri: str | None = None, endpoint_url: str | None = None) -> Backend:
    """The backend ``webapp.source`` asks for (a ``model_uri`` or ``endpoint_url`` given by hand wins)."""
    if model_uri:
        return load_model_uri(model_uri, params)
    if endpoint_url or params.webapp.source == "endpoint":
        return load_endpoint(params, endpoint_url)
    return load_registry(params)


class BackendLoader:
    """:func:`load_backend` on a thread of its own, so that ``emassist web`` answers (health, the page) while the model
    loads: ``start(on_ready, on_error)`` calls ``on_ready(backend)`` or ``on_error(exc)`` from that thread (``exc`` a
    :class:`BackendError`, or whatever else the load raised). ``seconds``: how long the load took."""

    def __init__(self, params: Params, *, model_uri: str | None = None, endpoint_url: str | None = None) -> None:
        self.params = params
        self.model_uri = model_uri
        self.endpoint_url = endpoint_url
        self.seconds: float | None = None
        self.thread: threading.Thread | None = None

    def load(self) -> Backend:
        """The load itself, on the calling thread (after the test hook's hold, when one is set)."""
        _test_hold()
        return load_backend(self.params, model_uri=self.model_uri, endpoint_url=self.endpoint_url)

    def start(self, on_ready: Callable[[Backend], None], on_error: Callable[[BaseException], None]) -> threading.Thread:
        def run() -> None:
            started = time.perf_counter()
            try:
                backend = self.load()
            except Exception as exc:  # every failure is reported (the page says why); none kills the server
                self.seconds = time.perf_counter() - started
                if not isinstance(exc, BackendError):
                    log.exception("the model could not be loaded")
                on_error(exc)
                return
            self.seconds = time.perf_counter() - started
            on_ready(backend)

        # a daemon: a server stopped while the model still loads does not wait for the load to finish
        self.thread = threading.Thread(target=run, name="model-load", daemon=True)
        self.thread.start()
        return self.thread


def _test_hold() -> None:
    """TEST HOOK (:data:`ENV_TEST_HOLD_LOAD`): wait until the named file exists. Nothing happens when it is unset."""
    gate = os.environ.get(ENV_TEST_HOLD_LOAD, "").strip()
    if not gate:
        return
    log.warning("%s is set (a test hook): the model loads once %s exists", ENV_TEST_HOLD_LOAD, gate)
    while not Path(gate).exists():
        time.sleep(0.05)
