"""The pixel size of an uploaded file, read the way ingest reads it: what a scale-aware model gets when the caller
sends none (:mod:`emassist.model.scale`).

Kept out of the model layer so that training and evaluation (which take ingest's manifest) do not depend on the OCR
code, and a change there does not retrain a model.
"""

from __future__ import annotations

from typing import Any

from emassist.data.databar import find_databar
from emassist.data.pixelsize import resolve_pixel_size


def file_pixel_size(decoded: Any, bar_rows: int | None, *, bar_not_read: str | None) -> tuple[float | None, str, str]:
    """``(nm, source, reason)`` of a decoded file, the way ingest reads it (:func:`emassist.data.pixelsize.
    resolve_pixel_size`: the tags, else the data bar's rows, else unknown). ``bar_rows``: the rows the
    preprocessor cropped (None: it does not crop, so the bar is looked for here). ``bar_not_read``: why the bar is
    not to be read (no OCR engine), or None."""
    gray = decoded.gray
    rows = find_databar(gray) if bar_rows is None else bar_rows
    bar = gray[gray.shape[0] - rows :] if rows else None
    size = resolve_pixel_size(decoded.metadata.get("pixel_size_nm"), bar, decoded.width, bar_not_read=bar_not_read)
    return size.nm, size.source, size.reason
