"""The watcher's model: the SAME preprocessing and answer as ``emassist predict`` and the page.

A :class:`~emassist.serve.backend.Backend` from :func:`~emassist.serve.backend.load_backend` (the champion,
``--model`` or ``--endpoint``). Files are read, hashed and decoded by the served model's own
:class:`~emassist.serve.pyfunc.SemClassifier.prepare_many` (the decode, data-bar crop, featureless check and
resize ingest uses, with the ingest's rejection reasons); the answers (calibrated probabilities, ``needs_review``,
``unfamiliar``) come from the model's ``score`` + ``result_frame``, in-process, or from the running ``mlflow models
serve`` for the standardized images (``standardized``: the server only resizes them, as for the tile scan).

A scale-aware model (:mod:`emassist.model.scale`; :attr:`Scorer.scale_aware`): ``prepare`` reads each file's pixel
size as the pyfunc does (its tags, else its data bar, else unknown: :attr:`Prepared.scale`), :meth:`Scorer.answer`
gives it to the model (in-process: the ``"scale"`` input; an endpoint: the ``pixel_size_nm`` of each PNG sent, nm per
pixel of the PNG, so that the server's model-input pixel size is the file's) and the answer says which size it used:
``pixel_size_nm`` (of the file), ``model_pixel_size_nm`` (of the model input) and ``pixel_size_source``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import requests

from emassist.model.scale import ScaleUsed, scale_batch, valid_pixel_size
from emassist.serve.backend import Backend, BackendError, LocalBackend
from emassist.serve.client import ServingError
from emassist.serve.drawing import png_bytes
from emassist.serve.predlog_hooks import ModelIdentity
from emassist.serve.pyfunc import SCALE_COLUMNS, Prepared, SemClassifier


class Scorable(Protocol):
    """What :meth:`Scorer.answer` takes of each prepared file (a :class:`Prepared`, or the watcher's queued item)."""

    @property
    def image(self) -> np.ndarray | None: ...

    @property
    def scale(self) -> ScaleUsed | None: ...


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
            if self.model.scale_aware:  # the files' pixel sizes are read here, as the served model would
                from emassist.data.scalebar import engine_available  # lazy: the OCR engine

                self.model.bar_not_read = engine_available()
        #: whether the model takes the pixel size (the answers then say which one it used)
        self.scale_aware = bool(getattr(self.model, "scale_aware", False))
        info = backend.info
        self.identity = ModelIdentity(info.name, info.version, info.alias)
        self.familiarity_checked = backend.familiarity_checked

    @property
    def label(self) -> str:
        return self.backend.info.label

    def prepare(self, paths: Sequence[str]) -> list[Prepared]:
        """Read each file once (sha256, decode, standardize, the log's facts); a bad file gets its reason."""
        return self.model.prepare_many(list(paths), files=True, details=True)

    def answer(self, items: Sequence[Scorable]) -> pd.DataFrame:
        """Prepared files (each with its standardized uint8 ``image`` and, for a scale-aware model, the pixel size
        ``prepare`` read: ``scale``) → one answer row each (label, confidence, classes, error, trust columns; a
        scale-aware model also ``pixel_size_nm``, ``model_pixel_size_nm``, ``pixel_size_source``).

        Raises :class:`BackendError` when an endpoint cannot answer (the batch is retried, nothing is lost)."""
        if not items:
            return pd.DataFrame()
        images = np.stack([np.asarray(it.image, dtype=np.uint8) for it in items])
        scales: list[ScaleUsed | None] = [getattr(it, "scale", None) for it in items] if self.scale_aware else []
        scale = scale_batch(scales) if self.scale_aware else None
        if isinstance(self.backend, LocalBackend):  # the page may share it (web --watch): its score holds the lock
            proba, scores = self.backend.score(images, scale) if self.scale_aware else self.backend.score(images)
            return self.model.result_frame(proba, [""] * len(items), scores, scales or None)
        if self.local:
            proba, scores = self.model.score(images, scale) if self.scale_aware else self.model.score(images)
            return self.model.result_frame(proba, [""] * len(items), scores, scales or None)
        if not self.scale_aware:
            return self._endpoint(list(images), None)
        # The endpoint gets the known sizes as the PNGs' own (nm per pixel of the PNG: the server scales it back by
        # the PNG's width over image_size) and the unknown ones in a second request without the column (a column is
        # all numbers); the rows then say the FILE's size and source, not the PNG's.
        side, width = float(self.model.preprocessor.image_size or 0), float(images.shape[2])
        png_nm: dict[int, float] = {}
        for i, u in enumerate(scales):
            nm = valid_pixel_size(u.model_nm * side / width) if u is not None and u.model_nm is not None else None
            if nm is not None:
                png_nm[i] = nm
            elif u is not None and u.model_nm is not None:  # (a PNG pixel beyond the plausible range: never sent)
                scales[i] = ScaleUsed.unknown("its pixel size cannot be sent for the standardized image")
        known = sorted(png_nm)
        unknown = sorted(set(range(len(items))) - set(known))
        parts: list[pd.DataFrame] = []
        if known:
            sent = self._endpoint([images[i] for i in known], [png_nm[i] for i in known])
            parts.append(sent.set_axis(known))
        if unknown:
            parts.append(self._endpoint([images[i] for i in unknown], None).set_axis(unknown))
        frame = pd.concat(parts).sort_index()
        for column, values in zip(SCALE_COLUMNS, _scale_columns(scales), strict=True):
            frame[column] = values
        return frame.reset_index(drop=True)

    def _endpoint(self, images: list[np.ndarray], pixel_sizes: list[float] | None) -> pd.DataFrame:
        """One request of standardized PNGs to the model endpoint (``pixel_sizes``: nm per pixel of each PNG)."""
        client = getattr(self.backend, "client", None)
        if client is None:
            raise BackendError(f"{self.label}: this backend cannot answer batches")
        try:
            if pixel_sizes is None:
                frame = client.predict_bytes([png_bytes(g) for g in images], standardized=True)
            else:
                frame = client.predict_bytes([png_bytes(g) for g in images], standardized=True,
                                             pixel_sizes=pixel_sizes)  # fmt: skip
        except ServingError as exc:
            raise BackendError(f"model endpoint answered {exc.status}: {exc.message[:300]}") from exc
        except requests.RequestException as exc:
            raise BackendError(f"model endpoint unreachable: {type(exc).__name__}") from exc
        missing = [c for c in self.classes if c not in frame.columns]
        if missing or len(frame) != len(images):
            raise BackendError(f"model endpoint answered {len(frame)} rows without the classes {missing}")
        return frame.reset_index(drop=True)


def _scale_columns(scales: Sequence[ScaleUsed | None]) -> tuple[list[float], list[float], list[str]]:
    """The answer's three pixel-size columns for these sizes (NaN and ``unknown`` where none is known)."""
    nm = [np.nan if u is None or u.nm is None else float(u.nm) for u in scales]
    model_nm = [np.nan if u is None or u.model_nm is None else float(u.model_nm) for u in scales]
    return nm, model_nm, ["unknown" if u is None else u.source for u in scales]


def scale_fields(row: Any) -> dict[str, Any]:
    """The watcher's record fields of an answer row's pixel size: ``pixel_size_nm`` and ``model_pixel_size_nm``
    (None when unknown) and ``pixel_size_source``."""

    def number(name: str) -> float | None:
        try:
            value = float(row.get(name))
        except (TypeError, ValueError):
            return None
        return round(value, 6) if np.isfinite(value) else None

    return {"pixel_size_nm": number("pixel_size_nm"), "model_pixel_size_nm": number("model_pixel_size_nm"),
            "pixel_size_source": str(row.get("pixel_size_source") or "unknown")}  # fmt: skip
