"""Where the web page (and ``emassist scan``) gets its predictions: the registry's model in-process, or a running
``mlflow models serve`` endpoint (``webapp.source``).

Both take the serving path of ``emassist/serve/pyfunc.py``: ``imaging.decode_image`` → ``imaging.standardize`` →
``preprocess.to_model_input`` → the Keras model. In-process, this module calls the loaded ``SemClassifier``'s
own methods; through the endpoint, the image file (or a tile as PNG) goes to ``/invocations`` as base64.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from emassist.config.settings import Params

log = logging.getLogger("emassist.webapp")


class BackendError(RuntimeError):
    """The model cannot be loaded or reached; the message says which and why."""


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


class Backend:
    """What the page needs from a model."""

    info: ModelInfo
    classes: list[str]
    cache_size: int
    crop_databar: bool

    def probabilities(self, gray: np.ndarray) -> np.ndarray:
        """Standardized uint8 images ``[B, S, S]`` → probabilities ``[B, n_classes]``."""
        raise NotImplementedError

    def classify_file(self, data: bytes, gray: np.ndarray) -> np.ndarray:
        """One uploaded image (its file bytes, and its standardized image) → probabilities ``[n_classes]``."""
        return self.probabilities(gray[None])[0]

    def keras_model(self) -> tuple[Any, int]:
        """(the Keras model, its input size) for Grad-CAM; raises BackendError where there is none."""
        raise BackendError("this model source has no Keras model for Grad-CAM")


class LocalBackend(Backend):
    """A ``SemClassifier`` loaded in this process (from the registry, a model folder or a ``.keras`` file)."""

    def __init__(self, model: Any, info: ModelInfo) -> None:
        self.model = model
        self.info = info
        self.classes = list(model.classes)
        self.cache_size = int(model.cache_size)
        self.crop_databar = bool(model.crop_databar)
        self._lock = threading.Lock()  # one forward pass at a time: two cores, one model

    def probabilities(self, gray: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.asarray(self.model.probabilities(np.asarray(gray, dtype=np.uint8)), dtype=np.float32)

    def keras_model(self) -> tuple[Any, int]:
        return self.model.model, int(self.model.image_size)


class EndpointBackend(Backend):
    """A running ``mlflow models serve`` of the SEM pyfunc."""

    def __init__(self, url: str, params: Params, info: ModelInfo, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.info = info
        self.timeout = timeout
        self.params = params
        self.classes = list(params.data.classes)
        self.cache_size = params.ingest.cache_size
        self.crop_databar = params.ingest.crop_databar
        self._keras: tuple[Any, int] | None = None

    def _invoke(self, blobs: list[bytes]) -> np.ndarray:
        import requests

        payload = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode("ascii")] for b in blobs]}
        }
        try:
            resp = requests.post(f"{self.url}/invocations", json=payload, timeout=self.timeout)
        except requests.RequestException as exc:
            raise BackendError(f"model endpoint {self.url} unreachable: {type(exc).__name__}") from exc
        if resp.status_code != 200:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            raise BackendError(f"model endpoint answered {resp.status_code}: {str(message)[:300]}")
        rows = resp.json()["predictions"]
        if rows:
            known = [k for k in rows[0] if k not in ("label", "confidence", "error")]
            if known and known != self.classes:
                self.classes = known
        errors = [str(r.get("error") or "") for r in rows]
        if any(errors):
            raise BackendError("model endpoint refused an image: " + "; ".join(e for e in errors if e)[:300])
        return np.array([[float(r[c]) for c in self.classes] for r in rows], dtype=np.float32)

    def probabilities(self, gray: np.ndarray) -> np.ndarray:
        from PIL import Image

        blobs = []
        for g in np.asarray(gray, dtype=np.uint8):
            buf = io.BytesIO()
            Image.fromarray(g).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        return self._invoke(blobs)

    def classify_file(self, data: bytes, gray: np.ndarray) -> np.ndarray:
        return self._invoke([data])[0]

    def keras_model(self) -> tuple[Any, int]:
        """The registry's model for the same alias, loaded on first use (the endpoint serves no gradients)."""
        if self._keras is None:
            try:
                local = load_registry(self.params)
            except BackendError as exc:
                raise BackendError(f"Grad-CAM needs the Keras model from the registry: {exc}") from exc
            self._keras = local.keras_model()
        return self._keras


# ------------------------------------------------------------------------------------------------ loading


def _client(params: Params) -> Any:
    import mlflow

    mlflow.set_tracking_uri(params.mlflow.resolved_tracking_uri())
    return mlflow.MlflowClient()


def resolve_alias(params: Params) -> tuple[str, str]:
    """(version, run_id) the configured alias points at; raises BackendError."""
    from mlflow.exceptions import MlflowException

    name, alias = params.mlflow.registered_model, params.webapp.alias
    try:
        mv = _client(params).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise BackendError(
            f"no model {name}@{alias} in the registry at {params.mlflow.resolved_tracking_uri()} "
            f"(run `dvc repro` or `emassist promote --version N`): {exc.message.splitlines()[0]}"
        ) from exc
    return str(mv.version), str(mv.run_id or "")


def load_registry(params: Params) -> LocalBackend:
    """``models:/<mlflow.registered_model>/<version of webapp.alias>``, loaded in-process."""
    from mlflow.exceptions import MlflowException

    from emassist.serve.predict import load_predictor

    name, alias = params.mlflow.registered_model, params.webapp.alias
    version, run_id = resolve_alias(params)
    uri = f"models:/{name}/{version}"
    try:
        model = load_predictor(uri)
    except MlflowException as exc:
        raise BackendError(f"cannot load {uri}: {exc.message.splitlines()[0]}") from exc
    if not hasattr(model, "probabilities"):
        raise BackendError(f"{uri} is not the SEM classifier pyfunc (emassist/serve/pyfunc.py)")
    return LocalBackend(model, ModelInfo(name, version, alias, "registry", uri, run_id))


def load_model_uri(uri: str, params: Params) -> LocalBackend:
    """A model named by hand: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a model folder or a ``.keras`` file."""
    from mlflow.exceptions import MlflowException

    from emassist.serve.predict import load_predictor

    _client(params)
    try:
        model = load_predictor(uri, params)
    except MlflowException as exc:
        raise BackendError(f"cannot load {uri}: {exc.message.splitlines()[0]}") from exc
    if not hasattr(model, "probabilities"):
        raise BackendError(f"{uri} is not the SEM classifier pyfunc (emassist/serve/pyfunc.py)")
    name, version, alias = os.path.basename(uri.rstrip("/")), "", ""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            try:
                version = str(_client(params).get_model_version_by_alias(name, alias).version)
            except MlflowException:
                version = ""
        else:
            name, _, version = rest.partition("/")
    return LocalBackend(model, ModelInfo(name, version, alias, "registry" if alias or version else "file", uri))


def load_endpoint(params: Params, url: str | None = None) -> EndpointBackend:
    """A running ``mlflow models serve``; the version shown is what the registry says the alias points at."""
    import requests

    url = (url or params.webapp.endpoint_url).rstrip("/")
    try:
        ok = requests.get(f"{url}/ping", timeout=5).status_code == 200
    except requests.RequestException:
        ok = False
    if not ok:
        raise BackendError(f"no model server answers at {url}/ping (start `mlflow models serve ...` first)")
    try:
        version, run_id = resolve_alias(params)
    except BackendError:
        version, run_id = "", ""
    info = ModelInfo(params.mlflow.registered_model, version, params.webapp.alias, "endpoint", url, run_id)
    return EndpointBackend(url, params, info, params.webapp.endpoint_timeout_s)


def load_backend(params: Params, *, model_uri: str | None = None, endpoint_url: str | None = None) -> Backend:
    """The backend ``webapp.source`` asks for (a ``model_uri`` or ``endpoint_url`` given by hand wins)."""
    if model_uri:
        return load_model_uri(model_uri, params)
    if endpoint_url or params.webapp.source == "endpoint":
        return load_endpoint(params, endpoint_url)
    return load_registry(params)
