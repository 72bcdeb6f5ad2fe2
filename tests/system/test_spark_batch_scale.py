"""``emassist batch`` with a scale-aware model (issue 15 part 2) on a real Spark (local[1]): the Parquet carries the
pixel size each answer used (``pixel_size_nm`` of the file from its TIFF tags, ``model_pixel_size_nm`` of the model
input, ``pixel_size_source``), null/empty for a file that got no answer, and the answers are the pyfunc's for the
same files. A model without the scale input writes the columns it always wrote (tests/system/test_spark_batch.py,
whose expected columns are unchanged)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emassist.config.settings import params_from_dict
from tests.code.test_scale_serving import _fei_tiff, _png
from tests.helpers import b64, texture
from tests.system.test_serving_scale import CLASSES, IMAGE_SIZE, save_scale_pyfunc

pytest.importorskip("pyspark")
pytest.importorskip("keras")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*An input example was not provided")]

NM = 2.0
H, W = 256, 512


def test_batch_parquet_has_the_pixel_size_each_answer_used(tmp_path: Path) -> None:
    import mlflow
    import pyarrow.parquet as pq

    from emassist.pipeline.batch import output_columns, run_batch, spark_session
    from emassist.serve.pyfunc import SCALE_COLUMNS

    model_dir = save_scale_pyfunc(tmp_path / "model", tmp_path)
    src = tmp_path / "archive"
    src.mkdir()
    gray = texture(H, W, seed=5)
    files = {
        "tagged.tif": _fei_tiff(gray, NM),
        "plain.png": _png(gray),
        "notes.png": b"operator notes\n",
        "empty.png": b"",
    }  # the empty one: Spark's read drops it, its row is added after the write
    for name, data in files.items():
        (src / name).write_bytes(data)
    params = params_from_dict({"batch": {"master": "local[1]", "glob": "*"},
                               "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})  # fmt: skip
    session = spark_session("local[1]", params, {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2"})
    try:
        report = run_batch(params, str(src), str(tmp_path / "out"), model=str(model_dir), spark=session,
                           log_predictions=False)  # fmt: skip
    finally:
        session.stop()
    rows = pd.read_parquet(tmp_path / "out" / "predictions")
    assert list(rows.columns) == output_columns(CLASSES, scale=True)
    assert list(rows.columns)[-5:-2] == list(SCALE_COLUMNS)
    by_name = rows.set_index(rows["path"].map(lambda p: Path(p).name))
    tagged, plain, notes = by_name.loc["tagged.tif"], by_name.loc["plain.png"], by_name.loc["notes.png"]
    assert tagged["pixel_size_source"] == "tags" and tagged["pixel_size_nm"] == pytest.approx(NM)
    assert tagged["model_pixel_size_nm"] == pytest.approx(NM * W / IMAGE_SIZE)
    assert plain["pixel_size_source"] == "unknown" and plain["error"] == ""
    assert _null(plain["pixel_size_nm"]) and _null(plain["model_pixel_size_nm"])
    table = pq.read_table(tmp_path / "out" / "predictions")
    assert table.column("model_pixel_size_nm").null_count == 3  # plain, notes and empty: null, not NaN
    assert notes["error"] == "not an image (content is text)" and notes["pixel_size_source"] == ""
    empty = by_name.loc["empty.png"]
    assert empty["error"] == "zero-byte file" and empty["pixel_size_source"] == "" and _null(empty["pixel_size_nm"])
    assert _null(notes["pixel_size_nm"]) and report.errors == 2
    # the answers are the pyfunc's for the same files (the tags' size reached the model)
    want = mlflow.pyfunc.load_model(str(model_dir)).predict(
        pd.DataFrame({"image": [b64(files["tagged.tif"]), b64(files["plain.png"])]})
    )
    got = rows.set_index(rows["path"].map(lambda p: Path(p).name)).loc[["tagged.tif", "plain.png"], CLASSES]
    np.testing.assert_allclose(got.to_numpy(), want[CLASSES].to_numpy(), atol=1e-5)
    assert output_columns(CLASSES) == [c for c in output_columns(CLASSES, scale=True) if c not in SCALE_COLUMNS]


def _null(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
