"""The watcher's model: the SAME preprocessing and answer as ``emassist predict`` and the page.

A :class:`~emassist.serve.backend.Backend` from :func:`~emassist.serve.backend.load_backend` (the champion,
``--model`` or ``--endpoint``). Files are read, hashed and decoded by the served model's own
:class:`~emassist.serve.pyfunc.SemClassifier.prepare_many` (the decode, data-bar crop, featureless check and
resize ingest uses, with the ingest's rejection reasons); the answers (calibrated probabilities, ``needs_review``,
``unfamiliar``) come from the model's ``score`` + ``result_frame``, in-process, or from the running ``mlflow models
serve`` for the standardized images (``standardized``: the server only resizes them, as for the tile scan).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import requests

from emassist.serve.backend import Backend, BackendError, LocalBackend
from emassist.serve.client import ServingError
from emassist.serve.drawing import png_bytes
from emassist.serve.predlog_hooks import ModelIdentity
from emassist.serve.pyfunc import Prepared, SemClassifier


class Scorer:
    """Prepare files and answer batches of standardized images with one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.classes = list(backend.classes)
        model = getattr(backend, "model", None)
        self.local = all(hasattr(model, a) for a in ("prepare_many", "score", "result_frame"))
        if self.local:
            self.model: SemClassifier = model  # type: ignore[assignment]
        else:  # an endpoint: the served version's own preprocessing (its registered serving config), no weights
            self.model = SemClassifier()
            self.model.configure(backend.config)
        info = backend.info
        self.identity = ModelIdentity(info.name, info.version, info.alias)
        self.familiarity_checked = backend.familiarity_checked

    @property
    def label(self) -> str:
        return self.backend.info.label

    def prepare(self, paths: Sequence[str]) -> list[Prepared]:
        """Read each file once (sha256, decode, standardize, the log's facts); a bad file gets its reason."""
        return self.model.prepare_many(list(paths), files=True, details=True)

    def answer(self, images: Sequence[np.ndarray]) -> pd.DataFrame:
        """Standardized uint8 images → one answer row each (label, confidence, classes, error, trust columns).

        Raises :class:`BackendError` when an endpoint cannot answer (the batch is retried, nothing is lost)."""
        if not images:
            return pd.DataFrame()
        if isinstance(self.backend, LocalBackend):  # the page may share it (web --watch): its score holds the lock
            proba, scores = self.backend.score(np.stack(list(images)))
            return self.model.result_frame(proba, [""] * len(images), scores)
        if self.local:
            proba, scores = self.model.score(np.stack(list(images)))
            return self.model.result_frame(proba, [""] * len(images), scores)
        client = getattr(self.backend, "client", None)
        if client is None:
            raise BackendError(f"{self.label}: this backend cannot answer batches")
        try:
            frame = client.predict_bytes([png_bytes(g) for g in images], standardized=True)
        except ServingError as exc:
            raise BackendError(f"model endpoint answered {exc.status}: {exc.message[:300]}") from exc
        except requests.RequestException as exc:
            raise BackendError(f"model endpoint unreachable: {type(exc).__name__}") from exc
        missing = [c for c in self.classes if c not in frame.columns]
        if missing or len(frame) != len(images):
            raise BackendError(f"model endpoint answered {len(frame)} rows without the classes {missing}")
        return frame.reset_index(drop=True)
