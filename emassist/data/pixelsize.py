"""The pixel size of an image and where it came from: TIFF tags, else the data bar, else unknown (with the reason).

Order: the instrument's tags (:mod:`emassist.data.sem_metadata`) win; the data bar (:mod:`emassist.data.scalebar`:
scale bar and label, else field width or magnification) is read all the same when there is one, so that a bar that
disagrees with the tags can be reported (the validate stage warns beyond a factor of 2, :data:`DISAGREEMENT_FACTOR`).
Never raises for odd content; an OCR engine that is missing or fails on one image makes only that reading unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from emassist.data.scalebar import OcrFailed, OcrUnavailable, read_databar

#: The sources of ``pixel_size_source`` in the manifest.
SOURCES: tuple[str, ...] = ("tags", "databar_scalebar", "databar_mag", "unknown")
#: Tags and bar further apart than this factor: the tags are used, and validation warns.
DISAGREEMENT_FACTOR = 2.0


@dataclass(frozen=True)
class PixelSize:
    """``nm`` (None when unknown), its ``source``, why it is unknown (``reason``), and what the bar said."""

    nm: float | None
    source: str
    reason: str = ""
    databar_text: str = ""
    databar_nm: float | None = None  # the bar's own reading, also where the tags won


def _valid(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) and value > 0 else None


def resolve_pixel_size(
    tags_nm: float | None, bar: np.ndarray | None, image_width: int, *, bar_not_read: str | None = None
) -> PixelSize:
    """The pixel size from the tags' value and the data-bar rows ``bar`` (None or empty: no bar).

    ``bar_not_read``: why the bar is not to be read at all (OCR off, or no engine); the bar then gives nothing.
    """
    tags = _valid(tags_nm)
    has_bar = bar is not None and bar.size > 0
    text, bar_nm, reason = "", None, ""
    if not has_bar:
        reason = "no data bar and no pixel size in the tags"
    elif bar_not_read:
        reason = f"data bar not read: {bar_not_read}"
    else:
        try:
            reading = read_databar(bar, image_width)
        except (OcrUnavailable, OcrFailed) as exc:
            reason = f"data bar not read: {exc}"
        else:
            text, bar_nm = reading.text, _valid(reading.pixel_size_nm)
            if bar_nm is not None and tags is None:
                return PixelSize(bar_nm, reading.source, "", text, bar_nm)
            reason = reading.reason
    if tags is not None:
        return PixelSize(tags, "tags", "", text, bar_nm)
    return PixelSize(None, "unknown", reason, text, bar_nm)


def disagreement(tags_nm: float | None, bar_nm: float | None) -> float | None:
    """How many times tags and bar differ (>= 1), or None when either is missing."""
    a, b = _valid(tags_nm), _valid(bar_nm)
    if a is None or b is None:
        return None
    return max(a, b) / min(a, b)
