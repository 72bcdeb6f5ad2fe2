"""``emassist batch`` on a real Spark (local[2], one session for the module) with the registered small model as
champion: an archive of ~200 demo images plus the ingest tests' bad files, a re-run, the S3 path through a real moto
server.

The expected answers are ``emassist predict``'s (:func:`emassist.serve.predict.predict_paths` on the same champion).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from emassist.config.settings import params_from_dict
from emassist.data.hashing import file_sha256
from emassist.model.provenance import DEMO_NOTICE
from tests.helpers import SMALL_CLASSES, SmallModel, demo_image, encode, png_header_only, with_databar
from tests.s3_support import aws_env, fake_secret, moto_server, patched_environ
from tests.servers import tracking_uri_env
from tests.webapp_support import Champion, params_dict, register_champion

pytest.importorskip("pyspark")

N_PER_CLASS = 66  # 198 good images
MAX_FILE_BYTES = 60_000
SPARK_CONF = {"spark.ui.enabled": "false", "spark.driver.memory": "1g", "spark.sql.shuffle.partitions": "4"}
#: The ingest tests' bad files (tests/data/test_ingest.py) that are files; plus one over batch.max_file_bytes.
BAD = {
    "bad/empty.jpg": "zero-byte file",
    "bad/truncated.jpg": "truncated",
    "bad/notes.png": "not an image (content is text)",
    "bad/bomb.png": "decompression bomb",
    "bad/tiny.png": "too small: 1x1",
    "bad/blank.png": "featureless image",
    "bad/bar_only.png": "featureless image",
    "bad/large.png": f"bytes exceeds batch.max_file_bytes={MAX_FILE_BYTES}",
}


def build_archive(root: Path) -> list[Path]:
    """Demo images of the small model's classes in nested folders (PNG, some JPEG, some with a data bar), and BAD."""
    files = []
    for k, cls in enumerate(SMALL_CLASSES):
        for i in range(N_PER_CLASS):
            gray = demo_image(cls, 300 + i, 64, seed=11)
            if i % 5 == 0:
                gray, _ = with_databar(gray, seed=i)
            fmt, ext = ("JPEG", "jpg") if i % 7 == 0 else ("PNG", "png")
            path = root / f"site{k % 2}" / cls / f"{i // 20}" / f"img {i:03d}.{ext}"  # spaces in names
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(Image.fromarray(gray), fmt, **({"quality": 95} if fmt == "JPEG" else {})))
            files.append(path)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    jpeg = encode(Image.fromarray(demo_image("Fibres", 5, 160)), "JPEG", quality=90)
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "notes.png").write_bytes(b"operator notes: sample 3 charged badly\n")
    (bad / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (bad / "tiny.png").write_bytes(encode(Image.new("L", (1, 1)), "PNG"))
    (bad / "blank.png").write_bytes(encode(np.zeros((40, 48), np.uint8), "PNG"))
    (bad / "bar_only.png").write_bytes(encode(with_databar(np.full((180, 240), 30, np.uint8))[0], "PNG"))
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    (bad / "large.png").write_bytes(encode(Image.fromarray(noise), "PNG"))
    (root / "README.txt").write_text("not matched by batch.glob\n")
    return files + [root / rel for rel in BAD]


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory, small_model: SmallModel) -> Iterator[Champion]:
    champ = register_champion(tmp_path_factory.mktemp("spark-champion"), small_model)
    with tracking_uri_env(champ.tracking_uri):
        yield champ


@pytest.fixture(scope="module")
def params(champion: Champion) -> Any:
    raw = params_dict(champion.root, champion.tracking_uri)
    raw["batch"] = {"master": "local[2]", "max_file_bytes": MAX_FILE_BYTES}
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def spark(params: Any) -> Iterator[Any]:
    from emassist.pipeline.batch import spark_session

    session = spark_session("local[2]", params, SPARK_CONF)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("archive")
    return root, build_archive(root)


@pytest.fixture(scope="module")
def expected(champion: Champion, params: Any, archive: tuple[Path, list[Path]]) -> pd.DataFrame:
    """What ``emassist predict`` answers for the same files with the same champion."""
    from emassist.serve.predict import load_model, predict_paths

    predictor, _ = load_model(f"models:/{champion.params.mlflow.registered_model}@champion", params)
    frame = predict_paths([str(p) for p in archive[1]], predictor, params=params, progress=False)
    return frame.set_index("path")


@pytest.fixture(scope="module")
def first_run(params: Any, spark: Any, archive: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Any, Path, list[str]]:  # fmt: skip
    from emassist.pipeline.batch import run_batch

    out = tmp_path_factory.mktemp("batch-out")
    said: list[str] = []
    report = run_batch(params, str(archive[0]), str(out), spark=spark, announce=said.append)
    return report, out, said


def read_rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "predictions")


def test_every_file_has_exactly_one_row_with_predicts_answer(
    first_run: tuple[Any, Path, list[str]], archive: tuple[Path, list[Path]], expected: pd.DataFrame
) -> None:
    report, out, _ = first_run
    rows = read_rows(out)
    files = archive[1]
    assert sorted(rows["path"]) == sorted(str(p) for p in files)  # README.txt is not matched by batch.glob
    assert rows["path"].is_unique
    good = rows[rows["error"] == ""].set_index("path")
    assert len(good) == len(files) - len(BAD)
    want = expected.loc[good.index]
    assert (want["error"] == "").all()
    assert list(good["label"]) == list(want["label"])
    for column in ("confidence", *SMALL_CLASSES, "unfamiliar_score"):
        np.testing.assert_allclose(good[column].to_numpy(), want[column].to_numpy(dtype=float), atol=1e-5)
    assert list(good["needs_review"]) == list(want["needs_review"].astype(bool))
    assert list(good["review_reason"]) == list(want["review_reason"].fillna(""))
    assert (good["model_name"] == "sem-web-test").all() and (good["model_version"] == "1").all()
    for path in good.index[:20]:
        assert good.loc[path, "sha256"] == file_sha256(path)  # as ingest hashes a file
    assert report.files == len(files) and report.errors == len(BAD)


def test_bad_files_carry_their_reason(first_run: tuple[Any, Path, list[str]], archive: tuple[Path, list[Path]],
                                      expected: pd.DataFrame) -> None:  # fmt: skip
    rows = read_rows(first_run[1]).set_index("path")
    root = archive[0]
    for rel, reason in BAD.items():
        row = rows.loc[str(root / rel)]
        assert reason in row["error"], (rel, row["error"])
        assert (row["label"], row["confidence"], row["needs_review"]) == ("", 0.0, True)
        assert row[list(SMALL_CLASSES)].sum() == 0.0
        if rel != "bad/large.png":  # emassist predict has no size limit of its own: it decodes that one
            assert row["error"] == expected.loc[str(root / rel), "error"]
    large = root / "bad/large.png"
    assert rows.loc[str(large), "error"].startswith(f"file too large: {large.stat().st_size} bytes")
    assert rows.loc[str(root / "bad/empty.jpg"), "sha256"] == file_sha256(root / "bad/empty.jpg")


def test_summary_manifest_and_demo_notice(first_run: tuple[Any, Path, list[str]]) -> None:
    report, out, said = first_run
    summary = pd.read_csv(out / "summary.csv")
    rows = read_rows(out)
    assert int(summary["files"].sum()) == len(rows)
    by_class = summary.set_index("class")
    assert int(by_class.loc["(error)", "files"]) == len(BAD)
    for cls in SMALL_CLASSES:
        assert int(by_class.loc[cls, "files"]) == int((rows["label"] == cls).sum())
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["model_version"] == "1" and manifest["files"] == len(rows)
    assert report.notice == DEMO_NOTICE and any(DEMO_NOTICE in line for line in said)  # said before any answer
    assert report.logged == len(rows) - len(BAD)  # answered rows went to the prediction log, source "batch"


def test_prediction_log_rows(first_run: tuple[Any, Path, list[str]], params: Any) -> None:
    from emassist.data.predlog import PredictionLog

    logged = PredictionLog(params.monitoring.resolved_db_uri()).predictions()
    batch = logged[logged["source"] == "batch"]
    rows = read_rows(first_run[1]).set_index("path")
    assert len(batch) == first_run[0].logged
    one = batch.iloc[0]
    assert rows.loc[one["origin"], "sha256"] == one["sha256"] and rows.loc[one["origin"], "label"] == one["label"]


def logged_batch_rows(params: Any) -> pd.DataFrame:
    from emassist.data.predlog import PredictionLog

    logged = PredictionLog(params.monitoring.resolved_db_uri()).predictions()
    return logged[logged["source"] == "batch"]


def test_rerun_replaces_and_never_duplicates(
    first_run: tuple[Any, Path, list[str]], params: Any, spark: Any, archive: tuple[Path, list[Path]]
) -> None:
    """Neither the Parquet nor the prediction log: the re-run logs only the one new image."""
    from emassist.pipeline.batch import run_batch

    _, out, _ = first_run
    before = read_rows(out).sort_values("path", ignore_index=True)
    log_before = logged_batch_rows(params)
    extra = archive[0] / "site0" / "late.png"
    extra.write_bytes(encode(Image.fromarray(demo_image("Particles", 900, 64, seed=11)), "PNG"))
    try:
        again = run_batch(params, str(archive[0]), str(out), spark=spark, log_predictions=True)
    finally:
        extra.unlink()
    after = read_rows(out)
    assert len(after) == len(before) + 1 and after["path"].is_unique
    same = after[after["path"] != str(extra)].sort_values("path", ignore_index=True)
    pd.testing.assert_frame_equal(same[before.columns], before)
    assert sorted(p.name for p in out.iterdir()) == ["batch.json", "predictions", "summary.csv"]  # nothing left over
    log_after = logged_batch_rows(params)
    assert again.logged == 1 and len(log_after) == len(log_before) + 1
    assert list(log_after["origin"])[-1] == str(extra)
    assert not log_after.duplicated(["sha256", "model_name", "model_version"]).any()


def test_links_vanished_files_and_an_empty_listing(
    params: Any, spark: Any, archive: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row per file with a ``loop -> .`` folder link and a file link; a file removed between the listing and
    the read gets an error row (the job goes on); a re-run whose --glob matches nothing fails before writing and
    leaves the previous results as they were."""
    import shutil

    from emassist.pipeline import batch

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    good = [p for p in archive[1] if "Fibres" in str(p)][:3]
    for i, p in enumerate(good):
        shutil.copyfile(p, src / "a" / f"g{i}.png")
    doomed = src / "a" / "doomed.png"
    shutil.copyfile(good[0], doomed)
    os.symlink(".", src / "a" / "loop")
    os.symlink(src / "a" / "g1.png", src / "a" / "link.png")
    real_listing = batch.list_source

    def list_then_delete(*args: Any, **kwargs: Any) -> Any:
        listing = real_listing(*args, **kwargs)
        doomed.unlink()  # after the listing, before the read
        return listing

    monkeypatch.setattr(batch, "list_source", list_then_delete)
    out = tmp_path / "out"
    report = batch.run_batch(params, str(src), str(out), spark=spark, log_predictions=False)
    rows = read_rows(out).set_index("path")
    names = ["g0.png", "g1.png", "g2.png", "link.png", "doomed.png"]
    assert sorted(rows.index) == sorted(str(src / "a" / n) for n in names) and rows.index.is_unique
    assert rows.loc[str(doomed), "error"] == f"{batch.MISSING_REASON} (removed after listing)"
    assert rows.loc[str(src / "a" / "link.png"), "sha256"] == rows.loc[str(src / "a" / "g1.png"), "sha256"]
    assert (rows.drop(index=str(doomed))["error"] == "").all() and report.errors == 1

    monkeypatch.setattr(batch, "list_source", real_listing)
    before = read_rows(out)
    with pytest.raises(batch.BatchError, match=r"no files under .* match '\*\.nomatch'.*nothing was written"):
        batch.run_batch(params, str(src), str(out), spark=spark, glob="*.nomatch", log_predictions=False)
    pd.testing.assert_frame_equal(read_rows(out), before)
    assert sorted(p.name for p in out.iterdir()) == ["batch.json", "predictions", "summary.csv"]


def test_small_files_are_packed_into_few_tasks(spark: Any, archive: tuple[Path, list[Path]]) -> None:
    """In local mode MLflow's spark_udf loads the model once per task: ~200 small images must make few tasks, not
    the ones of ~32 files that Spark's default 4 MiB open cost per file would."""

    def tasks() -> int:
        scan = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(archive[0]))
        return int(scan.rdd.getNumPartitions())

    ours = tasks()
    key = "spark.sql.files.openCostInBytes"
    saved = spark.conf.get(key)
    spark.conf.set(key, str(4 * 1024 * 1024))
    try:
        default = tasks()
    finally:
        spark.conf.set(key, saved)
    assert ours <= 3 < default


def test_s3_source_is_mirrored_and_named_by_its_uris(
    params: Any, spark: Any, archive: tuple[Path, list[Path]], tmp_path: Path, first_run: tuple[Any, Path, list[str]]
) -> None:
    import dataclasses

    from emassist.data.s3 import make_client
    from emassist.pipeline.batch import run_batch
    from emassist.pipeline.batch_s3 import mirror_prefix

    env = aws_env(fake_secret(), tmp_path / "aws")
    root, files = archive
    chosen = [*[p for p in files if "Fibres" in str(p)][:6], root / "bad/notes.png", root / "bad/empty.jpg"]
    with moto_server(tmp_path, env) as moto, patched_environ({**env, "AWS_ENDPOINT_URL_S3": moto.url}):
        s3_params = dataclasses.replace(params, s3=dataclasses.replace(params.s3, endpoint_url=moto.url))
        client = make_client(s3_params.s3)
        client.create_bucket(Bucket="sem-archive")
        for p in chosen:
            client.upload_file(str(p), "sem-archive", f"2024/{p.relative_to(root).as_posix()}")
        client.put_object(Bucket="sem-archive", Key="2024/odd/../escape.png", Body=b"x")
        out = tmp_path / "s3-out"
        report = run_batch(s3_params, "s3://sem-archive/2024", str(out), spark=spark, log_predictions=False)
        # an object deleted from the bucket leaves the mirror that the next run scores (the mirror step alone: Spark
        # scores whatever the mirror holds, as the run above shows)
        deleted = out / ".s3-mirror" / "sem-archive" / "2024" / chosen[0].relative_to(root)
        assert deleted.is_file()
        client.delete_object(Bucket="sem-archive", Key=f"2024/{chosen[0].relative_to(root).as_posix()}")
        again = mirror_prefix(s3_params, "s3://sem-archive/2024", out / ".s3-mirror", progress=False)
    assert again.removed == 1 and not deleted.exists() and again.downloaded == 0
    assert (out / ".s3-mirror" / "sem-archive" / "2024" / chosen[1].relative_to(root)).is_file()
    first_rows = read_rows(out)
    rows = first_rows.set_index("path")
    want = {f"s3://sem-archive/2024/{p.relative_to(root).as_posix()}" for p in chosen}
    assert set(rows.index) == want | {"s3://sem-archive/2024/odd/../escape.png"}
    assert "'..' segment" in rows.loc["s3://sem-archive/2024/odd/../escape.png", "error"]
    assert rows.loc["s3://sem-archive/2024/bad/notes.png", "error"] == "not an image (content is text)"
    local = read_rows(first_run[1]).set_index("sha256")
    good = rows[rows["error"] == ""]
    assert len(good) == 6 and report.errors == 3
    for sha, label in zip(good["sha256"], good["label"], strict=True):
        assert local.loc[sha, "label"] == label  # the same bytes, the same answer as from the local folder
    assert os.path.isdir(out / ".s3-mirror")
