"""``emassist batch`` without Spark: a model URI or source that does not exist fails before Spark starts, with one
clear line; the pre-check agrees with the pyfunc's reasons; the small helpers (paths, --conf, s3:// URIs)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from emassist.cli.main import main
from emassist.config.classes import CLASSES
from emassist.data.preprocess import Preprocessor
from emassist.pipeline import batch
from emassist.pipeline.batch_s3 import split_s3
from emassist.pipeline.batch_udf import precheck_reason, sentinel_png
from tests.helpers import encode, png_header_only, texture

CONFIG: dict[str, Any] = {"classes": list(CLASSES), "cache_size": 64, "crop_databar": True, "max_pixels": 1_000_000,
                          "min_side": 16, "image_size": 48, "min_contrast": 2.0}  # fmt: skip


def no_spark(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("Spark must not start")


def run_cli(tmp_path: Path, *argv: str) -> tuple[int, str]:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--params", str(params), "batch", *argv])
    return code, err.getvalue()


def test_unknown_model_fails_before_spark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "spark_session", no_spark)
    (tmp_path / "src").mkdir()
    code, err = run_cli(tmp_path, str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                        "--model", "models:/no-such-model@champion")  # fmt: skip
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: cannot load model models:/no-such-model@champion: ")
    assert "Traceback" not in err


def test_folder_that_is_not_our_pyfunc_fails_before_spark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "spark_session", no_spark)
    (tmp_path / "not-a-model").mkdir()
    code, err = run_cli(tmp_path, str(tmp_path), "--out", str(tmp_path / "out"), "--model",
                        str(tmp_path / "not-a-model"))  # fmt: skip
    assert code == 1 and "is not an emassist SEM classifier pyfunc" in err


def test_missing_source_fails_before_spark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "spark_session", no_spark)
    model = tmp_path / "model"
    (model / "artifacts").mkdir(parents=True)
    (model / "artifacts" / "serving_config.json").write_text(json.dumps(CONFIG))
    code, err = run_cli(tmp_path, str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--model", str(model))
    assert code == 1 and f"error: {tmp_path / 'nowhere'}: no such file or folder" in err


def test_bad_conf_is_refused(tmp_path: Path) -> None:
    code, err = run_cli(tmp_path, str(tmp_path), "--out", str(tmp_path / "out"), "--conf", "spark.executor.memory")
    assert code == 1 and "expected KEY=VALUE" in err


def test_precheck_gives_the_pyfunc_reasons() -> None:
    pre = Preprocessor.from_config(CONFIG)
    assert precheck_reason(pre, encode(texture(48, 64, 1), "PNG")) == ""
    assert precheck_reason(pre, b"operator notes\n") == "not an image (content is text)"
    assert precheck_reason(pre, png_header_only(9_000, 9_000)).startswith("decompression bomb: 9000x9000")
    assert precheck_reason(pre, encode(Image.new("L", (1, 1)), "PNG")) == "too small: 1x1 (min_side=16)"
    assert precheck_reason(pre, encode(np.zeros((40, 48), np.uint8), "PNG")).startswith("featureless image")
    assert precheck_reason(pre, b"") == "zero-byte file"
    assert precheck_reason(pre, None) == "unreadable: no content"


def test_sentinel_is_an_image_the_model_takes() -> None:
    data = sentinel_png(CONFIG)
    assert precheck_reason(Preprocessor.from_config(CONFIG), data) == ""
    assert data == sentinel_png(CONFIG)  # deterministic


def test_paths_and_uris() -> None:
    assert batch.listed_path("file:///data/a%20b/%C3%A9.png") == "/data/a b/é.png"
    assert batch.listed_path("file:/data/x.png") == "/data/x.png"
    assert batch.listed_path("hdfs://nn/sem/x.png") == "hdfs://nn/sem/x.png"
    assert split_s3("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert split_s3("s3://bucket") == ("bucket", "")
    assert batch.output_columns(["A", "B"])[:6] == ["path", "sha256", "size_bytes", "label", "confidence", "A"]
    assert batch.is_local("results/") and not batch.is_local("s3a://b/out")


def test_a_scale_aware_model_s_columns_say_the_pixel_size_and_an_older_model_s_do_not() -> None:
    pytest.importorskip("pyspark")
    scale = ["pixel_size_nm", "model_pixel_size_nm", "pixel_size_source"]
    old, new = batch.output_columns(["A", "B"]), batch.output_columns(["A", "B"], scale=True)
    assert not set(scale) & set(old) and new[-5:] == [*scale, "model_name", "model_version"]
    assert [c for c in new if c not in scale] == old
    schema = batch.result_schema(["A", "B"], scale=True)
    assert [f.name for f in schema.fields][-3:] == scale
    assert [f.dataType.typeName() for f in schema.fields][-3:] == ["double", "double", "string"]
    assert [f.name for f in batch.result_schema(["A", "B"]).fields] == [f.name for f in schema.fields][:-3]
    resolved = batch.ResolvedModel("u", "/m", {**CONFIG, "scale_input": True}, "m", "1")
    assert resolved.scale_aware and not batch.ResolvedModel("u", "/m", CONFIG, "m", "1").scale_aware


def test_help_names_the_essentials() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(out.getvalue().split())
    words = ["--master", "--model", "--glob", "SPARK_MASTER", "Parquet", "summary.csv", "Java 17", "[spark]",
             "Folder symlinks are not followed", "matches no file fails before writing anything",
             "once per image and model version"]  # fmt: skip
    for word in words:
        assert word in text


def test_local_roots_follow_no_folder_link(tmp_path: Path) -> None:
    """A ``loop -> .`` link lists nothing twice (Hadoop's listing would follow it level after level); a file link is
    a file of its own; broken links and hidden names are skipped as Spark skips them; a clean subtree stays one
    root (Spark lists it)."""
    clean = tmp_path / "site0" / "deep"
    clean.mkdir(parents=True)
    (clean / "a.png").write_bytes(b"a")
    looped = tmp_path / "site1"
    looped.mkdir()
    (looped / "b.png").write_bytes(b"b")
    (looped / "c [1].png").write_bytes(b"c")
    os.symlink(".", looped / "loop")
    os.symlink(looped / "b.png", looped / "link.png")
    os.symlink(tmp_path / "gone.png", looped / "broken.png")
    (looped / ".hidden").mkdir()
    (looped / "_tmp.png").write_bytes(b"x")
    found = batch.local_roots(tmp_path)
    assert found.links == [str(looped / "loop")]
    assert sorted(found.roots) == sorted([str(tmp_path / "site0"), str(looped / "b.png"), str(looped / "c [1].png"),
                                          str(looped / "link.png")])  # fmt: skip
    assert batch.local_roots(tmp_path / "site0").roots == [str(tmp_path / "site0")]
    assert batch.local_roots(clean / "a.png").roots == [str(clean / "a.png")]
    assert batch.hadoop_escaped("/x/c [1]/{a,b}*?.png") == r"/x/c \[1\]/\{a,b\}\*\?.png"


def test_prune_mirror_removes_what_the_bucket_no_longer_has(tmp_path: Path) -> None:
    from emassist.pipeline.batch_s3 import prune_mirror

    keep = tmp_path / "a" / "kept.png"
    gone = tmp_path / "b" / "deleted.png"
    for p in (keep, gone):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert prune_mirror(tmp_path, {keep}) == 1
    assert keep.exists() and not gone.exists() and not gone.parent.exists()  # the empty folder went too
    assert prune_mirror(tmp_path / "nowhere", set()) == 0


def test_already_logged_is_per_source_and_model_version(tmp_path: Path) -> None:
    from emassist.data.predlog import PredictionLog, PredictionRow
    from emassist.serve.predlog_hooks import ModelIdentity

    store = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")

    def row(sha: str, source: str, version: str) -> PredictionRow:
        return PredictionRow(source=source, sha256=sha, label="A", confidence=0.9, probabilities={"A": 0.9},
                             needs_review=False, model_name="m", model_version=version)  # fmt: skip

    store.write([row("a" * 64, "batch", "1"), row("b" * 64, "batch", "2"), row("c" * 64, "cli", "1")])
    shas = ["a" * 64, "b" * 64, "c" * 64, "d" * 64] + [f"{i:064x}" for i in range(1200)]  # more than one query
    assert batch.already_logged(store, shas, ModelIdentity("m", "1")) == {"a" * 64}
    assert batch.already_logged(store, shas, ModelIdentity("m", "2")) == {"b" * 64}
    assert batch.already_logged(store, shas, ModelIdentity("other", "1")) == set()
