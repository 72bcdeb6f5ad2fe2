"""Ingest from a bucket against a real S3 endpoint (moto's server, a process on 127.0.0.1): paginated listing, refused
keys, corrupt objects quarantined by ingest, retries through a fault-injecting proxy, clear errors."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from emassist.config.settings import ParamsError, S3Params, params_from_dict
from tests.s3_support import Faults, aws_env, fake_secret, fault_proxy, moto_server, patched_environ
from tests.servers import free_port

CLASSES = ["Fibres", "Particles", "Tips"]
BUCKET = "sem-ingest"


def image(kind: str, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (40, 48)).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "tiff16":
        Image.fromarray(pixels.astype(np.uint16) * 250).save(buf, "TIFF")
    else:
        Image.fromarray(pixels).save(buf, {"png": "PNG", "jpg": "JPEG"}[kind])
    return buf.getvalue()


GOOD: dict[str, bytes] = {
    f"{cls}/{i:02d}.{kind.replace('tiff16', 'tif')}": image(kind, seed=10 * j + i)
    for j, cls in enumerate(CLASSES)
    for i, kind in enumerate(("png", "jpg", "tiff16", "png"))
}
GOOD["Tips/sub/deeper/nested.png"] = image("png", 99)
CORRUPT: dict[str, tuple[bytes, str]] = {  # downloaded, then quarantined by ingest: (content, reason fragment)
    "Fibres/truncated.jpg": (image("jpg", 1)[:300], "corrupt image"),
    "Particles/notes.png": (b"this is text, not an image\n" * 10, "not an image"),
    "Tips/empty.tif": (b"", "zero-byte"),
    "Tips/.DS_Store": (b"\x00\x00\x00\x01Bud1", "hidden"),
}
REFUSED: dict[str, str] = {  # key (relative to the prefix) -> reason fragment; never written to disk
    "../evil.png": "'..' segment",
    "Fibres/../../evil2.png": "'..' segment",
    "/abs.png": "absolute key",
    "Fibres//double.png": "empty path segment",
    "Fibres/./dot.png": "'.' segment",
    "Fibres\\windows.png": "backslash",
    "Fibres/tab\tx.png": "control character",
    "Unknown/x.png": "unknown class folder 'Unknown'",
    "toplevel.png": "not inside a class folder",
    "Particles/clash": "file/folder clash",
}
CLASH_CHILD = "Particles/clash/inner.png"  # accepted; its folder is also an object key (refused above)
OUTSIDE = {"other/Fibres/not-listed.png": image("png", 5)}  # outside the prefix: never listed


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    values = aws_env(fake_secret(), tmp_path_factory.mktemp("aws"))
    with patched_environ(values):
        yield values


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("moto-ingest")
    with moto_server(tmp, env) as m:
        yield m


def s3params(endpoint: str, **kw: Any) -> S3Params:
    return S3Params(**{"bucket": BUCKET, "prefix": "data/raw", "endpoint_url": endpoint, "workers": 4,
                       "retries": 3, "timeout_s": 10, **kw})  # fmt: skip


@pytest.fixture(scope="module")
def bucket(moto: Any) -> dict[str, bytes]:
    """The bucket's content: every key (under data/raw/) -> bytes."""
    import boto3
    from botocore.config import Config

    from emassist.data.s3 import ensure_bucket, make_client

    client = make_client(s3params(moto.url))
    assert ensure_bucket(client, BUCKET)
    # No extra checksum stored (as for objects written by older tools): the ETag (MD5) is what the pull checks.
    client = boto3.client("s3", endpoint_url=moto.url, config=Config(request_checksum_calculation="when_required"))
    content: dict[str, bytes] = {}
    content.update(GOOD)
    content.update({k: v for k, (v, _) in CORRUPT.items()})
    content.update({k: image("png", 7) for k in REFUSED})
    content[CLASH_CHILD] = image("png", 8)
    for rel, data in content.items():
        client.put_object(Bucket=BUCKET, Key=f"data/raw/{rel}", Body=data)
    client.put_object(Bucket=BUCKET, Key="data/raw/Fibres/", Body=b"")  # a console's folder marker
    for key, data in OUTSIDE.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return content


# --------------------------------------------------------------------------------------------- no server


@pytest.mark.parametrize(
    ("key", "fragment"), [*list(REFUSED.items())[:-1], ("", "empty key"), ("a/b\nc", "control"), ("a/\x7f", "control")]
)
def test_refuse_reason_names_the_problem(key: str, fragment: str) -> None:
    from emassist.data.s3 import refuse_reason

    reason = refuse_reason(key, frozenset(CLASSES))
    assert reason is not None and fragment in reason


@pytest.mark.parametrize("key", ["Fibres/a.png", "Tips/sub/deeper/b.tif", "Particles/..hidden-ish.png", "Tips/a b.jpg"])
def test_refuse_reason_accepts_plain_keys(key: str) -> None:
    from emassist.data.s3 import refuse_reason

    assert refuse_reason(key, frozenset(CLASSES)) is None


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"s3": {"bucket": "s3://sem-data"}}, "s3.bucket"),
        ({"s3": {"bucket": "Bad_Bucket"}}, "s3.bucket"),
        ({"s3": {"endpoint_url": "http://AKIA:secret@127.0.0.1:9000"}}, "s3.endpoint_url"),
        ({"s3": {"endpoint_url": "127.0.0.1:9000"}}, "s3.endpoint_url"),
        ({"s3": {"prefix": "raw/../x"}}, "s3.prefix"),
        ({"s3": {"workers": 0}}, "s3.workers"),
        ({"s3": {"aws_secret_access_key": "x"}}, "s3.aws_secret_access_key: unknown key"),
        ({"data": {"source": "s3"}}, "s3.bucket: data.source is s3"),
    ],
)
def test_bad_s3_params_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        params_from_dict(raw)


# --------------------------------------------------------------------------------------------- real endpoint


def test_pull_and_ingest_every_object_lands_somewhere(tmp_path: Path, moto: Any, bucket: dict[str, bytes]) -> None:
    """Paginated listing (4 keys a page), refused keys recorded, corrupt objects quarantined by ingest, the rest
    byte-identical; nothing written outside the data root."""
    from emassist.data.ingest import UPSTREAM_REJECTED_FILE, run_ingest
    from emassist.data.s3 import pull

    root = tmp_path / "work"
    raw = root / "data" / "raw"
    faults = Faults()
    with fault_proxy(moto.url, faults) as proxy:
        report = pull(s3params(proxy), raw, CLASSES, page_size=4, progress=False)
    n_keys = len(bucket) + 1  # + the folder marker
    assert faults.lists == -(-n_keys // 4)  # really paginated
    assert report.n_listed == n_keys and report.n_folder_markers == 1
    assert report.n_refused == len(REFUSED)
    assert report.n_downloaded == len(GOOD) + len(CORRUPT) + 1 and report.unverified == 0

    written = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    expected = {*GOOD, *CORRUPT, CLASH_CHILD, UPSTREAM_REJECTED_FILE}
    assert written == expected
    for rel in (*GOOD, CLASH_CHILD):
        assert hashlib.sha256((raw / rel).read_bytes()).digest() == hashlib.sha256(bucket[rel]).digest()
    outside = {p.name for p in tmp_path.rglob("*")} - {p.name for p in raw.rglob("*")} - {"work", "data", "raw"}
    assert not outside, f"files written outside the data root: {outside}"

    summary = run_ingest(raw, root / "data" / "interim", classes=CLASSES, cache_size=32, max_pixels=10_000_000,
                         min_side=16, crop_databar=False, workers=1, progress=False)  # fmt: skip
    manifest = pd.read_parquet(root / "data/interim/manifest.parquet")
    rejected = pd.read_csv(root / "data/interim/rejected.csv", keep_default_na=False)
    assert summary.n_files == len(bucket)  # every object under the prefix (the folder marker is no object of data)
    assert set(manifest["source_path"]) == {*GOOD, CLASH_CHILD}
    reasons = dict(zip(rejected["source_path"], rejected["reason"], strict=True))
    for rel, (_, fragment) in CORRUPT.items():
        assert fragment in reasons[rel], (rel, reasons[rel])
    for rel, fragment in REFUSED.items():
        shown = f"s3://{BUCKET}/data/raw/{rel}".replace("\t", "\\t")
        assert fragment in reasons[shown], (rel, reasons.get(shown))
    assert len(manifest) + len(rejected) == len(bucket)

    again = pull(s3params(moto.url), raw, CLASSES, progress=False)  # unchanged files are kept, not fetched again
    assert again.n_downloaded == 0 and again.n_unchanged == report.n_downloaded


def test_pull_retries_faults_and_ends_byte_identical(tmp_path: Path, moto: Any, bucket: dict[str, bytes]) -> None:
    from emassist.data.s3 import pull

    keys = sorted(GOOD)
    plan = {keys[0]: ["503", "503"], keys[1]: ["truncate"], keys[2]: ["corrupt"], keys[3]: ["truncate", "corrupt"]}
    faults = Faults(queued={f"data/raw/{k}": v for k, v in plan.items()})
    with fault_proxy(moto.url, faults) as proxy:
        report = pull(s3params(proxy), tmp_path / "raw", CLASSES, progress=False)
    assert faults.gets[f"data/raw/{keys[0]}"] == 3  # botocore's own retries on 503
    assert faults.gets[f"data/raw/{keys[1]}"] == 2 and faults.gets[f"data/raw/{keys[2]}"] == 2
    assert faults.gets[f"data/raw/{keys[3]}"] == 3
    assert report.retries == 4  # truncated x2, corrupted x2: caught by the size and MD5 checks
    for rel in keys:
        assert (tmp_path / "raw" / rel).read_bytes() == bucket[rel]


def test_persistent_corruption_fails_clearly_and_leaves_no_file(
    tmp_path: Path, moto: Any, bucket: dict[str, bytes]
) -> None:
    from emassist.data.s3 import S3Error, pull

    bad = sorted(GOOD)[0]
    faults = Faults(always={f"data/raw/{bad}": "corrupt"})
    with fault_proxy(moto.url, faults) as proxy, pytest.raises(S3Error) as err:
        pull(s3params(proxy, retries=2), tmp_path / "raw", CLASSES, progress=False)
    message = str(err.value)
    assert "1 of" in message and bad in message and "MD5: got" in message and "after 3 attempts" in message
    assert faults.gets[f"data/raw/{bad}"] == 3
    assert not (tmp_path / "raw" / bad).exists()
    assert not [p for p in (tmp_path / "raw").rglob("*") if p.name.endswith(".tmp")]
    assert (tmp_path / "raw" / sorted(GOOD)[1]).read_bytes() == bucket[sorted(GOOD)[1]]  # the others completed


def test_unreachable_endpoint_and_missing_bucket_are_clear(tmp_path: Path, moto: Any, env: dict[str, str]) -> None:
    from emassist.data.s3 import S3Error, pull

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(S3Error, match=f"cannot reach the S3 endpoint {dead}"):
        pull(s3params(dead, retries=0, timeout_s=2), tmp_path / "raw", CLASSES, progress=False)
    with pytest.raises(S3Error, match="bucket 'no-such-bucket' does not exist"):
        pull(s3params(moto.url, bucket="no-such-bucket"), tmp_path / "raw", CLASSES, progress=False)
    with pytest.raises(S3Error, match="no objects under s3://sem-ingest/nothing/"):
        pull(s3params(moto.url, prefix="nothing"), tmp_path / "raw", CLASSES, progress=False)


def test_cli_pull_and_acquire_stage(tmp_path: Path, moto: Any, bucket: dict[str, bytes], capsys: Any) -> None:
    import yaml

    from emassist.cli.main import main
    from stages import acquire

    params_file = tmp_path / "params.yaml"
    raw = tmp_path / "raw"
    params_file.write_text(yaml.safe_dump({
        "data": {"source": "s3", "classes": CLASSES, "raw_dir": str(raw)},
        "s3": {"bucket": BUCKET, "prefix": "data/raw", "endpoint_url": moto.url, "workers": 2},
    }))  # fmt: skip
    assert main(["--params", str(params_file), "s3", "pull", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{len(bucket) + 1} objects listed" in out and f"{len(REFUSED)} refused" in out
    assert (tmp_path / "cli" / sorted(GOOD)[0]).read_bytes() == bucket[sorted(GOOD)[0]]
    assert main(["--params", str(params_file), "s3", "pull", "--bucket", "Bad_Bucket"]) == 2
    assert "s3.bucket" in capsys.readouterr().err

    assert main(["--params", str(params_file), "s3", "mlflow-server", "--print", "--port", "5123"]) == 0
    out = capsys.readouterr().out
    assert f"MLFLOW_S3_ENDPOINT_URL={moto.url} mlflow server" in out
    assert f"--artifacts-destination s3://{BUCKET}/mlartifacts" in out and "--port 5123" in out
    assert main(["--params", str(params_file), "s3", "dvc-remote", "--print", "--default"]) == 0
    out = capsys.readouterr().out
    assert f"dvc remote add --local --force s3 s3://{BUCKET}/dvcstore" in out
    assert f"endpointurl {moto.url}" in out and "dvc remote default --local s3" in out
    assert load_env_secret() not in out

    from emassist.config.settings import load_params

    acquire.main(load_params(params_file))
    assert (raw / CLASH_CHILD).read_bytes() == bucket[CLASH_CHILD]
    assert secret_free(tmp_path, load_env_secret())


def load_env_secret() -> str:
    import os

    return os.environ["AWS_SECRET_ACCESS_KEY"]


def secret_free(root: Path, secret: str) -> bool:
    needle = secret.encode()
    return not [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
