"""The batch job's own Spark UDF (the pre-check) and what it needs, in a module that imports neither MLflow nor
TensorFlow: Spark's Python workers import it to run the UDF, and every import here is paid once per worker."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from emassist.data.decode import ImageRejected
from emassist.data.preprocess import Preprocessor

SENTINEL_SEED = 17


def precheck_reason(pre: Preprocessor, data: bytes | None) -> str:
    """Why the pyfunc would refuse these file bytes ("" when it takes them): the pyfunc's ``prepare``, less the
    model (decode, then standardize, with the same two kinds of failure)."""
    if data is None:
        return "unreadable: no content"
    try:
        pre.standardize(pre.decode(bytes(data)).gray)
        return ""
    except ImageRejected as exc:
        return exc.reason
    except Exception as exc:  # as the pyfunc: one odd image must not fail the others
        return f"cannot process image ({type(exc).__name__})"


def sentinel_png(config: dict[str, Any]) -> bytes:
    """A small valid image the model accepts (noise: not featureless, no data bar), scored in place of a refused
    file so that no batch the pyfunc sees is all bad; its answer is never kept. ValueError if the model refuses it."""
    from PIL import Image

    pre = Preprocessor.from_config(config)
    side = max(32, pre.min_side, pre.cache_size)
    gray = np.random.default_rng(SENTINEL_SEED).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    data = buf.getvalue()
    why = precheck_reason(pre, data)
    if why:  # pragma: no cover - a model whose checks refuse noise
        raise ValueError(f"the model refuses the stand-in image: {why}")
    return data


def precheck_udf(config: dict[str, Any]) -> Any:
    """A pandas UDF: file bytes → the reason the model (its serving ``config``) would refuse them ("" when fine)."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")  # type: ignore[call-overload]
    def precheck(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        pre = Preprocessor.from_config(config)  # once per task
        for contents in batches:
            yield pd.Series([precheck_reason(pre, c) for c in contents], dtype=object)

    return precheck.asNondeterministic()  # evaluated once per row, never duplicated by the optimizer
