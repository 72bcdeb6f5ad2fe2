"""S3 end to end against real processes on 127.0.0.1: moto's S3 server, an MLflow tracking server whose artifacts live
in that bucket (``--artifacts-destination s3://...``), ``dvc`` and the pipeline in a fresh copy of the repository.

1. ``dvc repro`` with ``data.source: s3`` ingests a bucket holding good images, keys that would escape the data root
   and corrupt objects; training logs to the MLflow server, whose artifacts land in S3; the model is registered.
2. The registered model is loaded back through the registry and served by ``mlflow models serve``.
3. ``emassist s3 dvc-remote`` + ``dvc push``; a fresh clone ``dvc pull``s raw data, interim images and splits,
   byte for byte.
4. The endpoint is killed in the middle of a ``dvc push``: a clear error; after a restart the retry completes and a
   fresh clone gets every file back. moto keeps its objects in memory, so the restarted server is given back the
   objects stored before the kill by replaying moto's request recording (what a real store would have kept);
   DVC then uploads only what is missing.
5. The fake secret access key, present in every process's environment, appears in no file written by any of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
import yaml

from tests.helpers import b64, copy_repo, demo_params, git_commit
from tests.s3_support import aws_env, fake_secret, patched_environ, replay_recording, start_moto
from tests.servers import mlflow_tracking_server, model_server, stop_process

pytestmark = pytest.mark.slow

BUCKET = "sem-team"
VENV_BIN = Path(sys.executable).parent
PIPELINE = {
    "data": {"source": "s3"},
    "demo": {"n_images": 100, "width": 64, "height": 64, "min_per_class": 8},
    "ingest": {"cache_size": 32, "workers": 2},
    "validate": {"min_per_class": 4, "max_rejected_fraction": 0.2},
    "augment": {"target_per_class": 8},
    "train": {"model": "simple_cnn", "image_size": 32, "epochs": 1, "batch_size": 16},
    "s3": {"bucket": BUCKET, "prefix": "sem/raw", "workers": 4, "retries": 2, "timeout_s": 20},
}
REFUSED_KEYS = ["sem/raw/../../escape.png", "sem/raw/Fibres//double.png", "sem/raw/Nowhere/x.png"]
CORRUPT_KEYS = {"sem/raw/Tips/broken.tif": b"II*\x00" + b"\x00" * 40, "sem/raw/Powder/readme.png": b"not an image"}
DVC_DATA = ("data/raw", "data/interim", "data/splits")


def sha_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


class World:
    def __init__(self, tmp: Path, secret: str, env: dict[str, str]) -> None:
        self.tmp, self.secret, self.env = tmp, secret, env
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.repo = tmp / "repo"
        self.moto: Any = None
        self.tracking_uri = ""

    def run(self, name: str, cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run a command with the test's environment; its output is kept as a file (scanned for the secret)."""
        env = {**os.environ, **self.env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
               "MLFLOW_TRACKING_URI": self.tracking_uri, "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        (self.logs / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, name: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(name, [sys.executable, "-m", "dvc", *args], cwd)

    def emassist(self, name: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(name, [str(VENV_BIN / "emassist"), *args], cwd)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.moto.url)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", []) or []]

    def uploads(self, prefix: str) -> int:
        """Objects under ``prefix`` the endpoint has stored so far, read from its access log: a listing through a new
        boto3 client takes long enough for a fast push to finish in the meantime."""
        marker = f'"PUT /{BUCKET}/{prefix}'
        return sum(1 for line in self.moto.log_file.read_text(errors="replace").splitlines()
                   if marker in line and '" 200 ' in line)  # fmt: skip

    def clone(self, name: str) -> Path:
        target = self.tmp / name
        subprocess.run(["git", "clone", "-q", str(self.repo), str(target)], check=True)
        site = target / ".dvc" / "site"
        site.mkdir(parents=True, exist_ok=True)
        assert self.dvc(f"{name}-site", target, "config", "--local", "core.site_cache_dir", str(site)).returncode == 0
        # config.local is not in git: every machine runs the documented command once.
        result = self.emassist(f"{name}-remote", target, "s3", "dvc-remote", "--default")
        assert result.returncode == 0, result.stderr
        return target


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("s3-pipeline")
    secret = fake_secret()
    w = World(tmp, secret, aws_env(secret, tmp / "aws"))
    with patched_environ(w.env):
        w.moto = start_moto(tmp, w.env, recording=tmp / "moto-recording.jsonl")
        try:
            # Machine-specific endpoint through the AWS SDKs' own variable: params.yaml keeps endpoint_url: null.
            w.env["AWS_ENDPOINT_URL_S3"] = w.moto.url
            os.environ["AWS_ENDPOINT_URL_S3"] = w.moto.url
            server_env = {**w.env, "MLFLOW_S3_ENDPOINT_URL": w.moto.url}
            (tmp / "mlflow").mkdir()
            w.client().create_bucket(Bucket=BUCKET)
            with mlflow_tracking_server(tmp / "mlflow", artifacts=f"s3://{BUCKET}/mlartifacts", env=server_env) as uri:
                w.tracking_uri = uri
                yield w
        finally:
            stop_process(w.moto.proc)
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)


@pytest.fixture(scope="module")
def built(world: World) -> World:
    """Seed the bucket, copy the repository, `dvc repro` everything from S3 with MLflow artifacts on S3."""
    from emassist.data.demo import generate_demo

    d = PIPELINE["demo"]
    seed_dir = world.tmp / "seed"
    generate_demo(seed_dir, demo_params(**d, seed=1, tif_fraction=0.1, databar_fraction=0.5), progress=False)
    world.n_seed = sum(1 for p in seed_dir.rglob("*") if p.is_file())  # type: ignore[attr-defined]

    repo = copy_repo(world.repo, overrides=PIPELINE)
    site = repo / ".dvc" / "site"
    site.mkdir(parents=True)
    ok(world.dvc("site", repo, "config", "--local", "core.site_cache_dir", str(site)))

    out = ok(world.emassist("s3-push", repo, "s3", "push", "--src", str(seed_dir), "--workers", "4"))
    assert f"{world.n_seed} uploaded" in out  # type: ignore[attr-defined]
    client = world.client()
    for key in REFUSED_KEYS:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"\x89PNG\r\n\x1a\n refused before download")
    for key, body in CORRUPT_KEYS.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)

    # acquire (from the bucket) -> ingest -> validate -> split -> augment, as DVC stages with cached outputs
    out = ok(world.dvc("repro", repo, "repro", "augment"))
    for stage in ("acquire", "ingest", "validate", "split", "augment"):
        assert f"Running stage '{stage}'" in out, stage
    # train -> evaluate -> register in this process (the pipeline steps the stages run; one TensorFlow start-up
    # instead of three on a shared 2-core machine), logging to the MLflow server with artifacts on S3
    from emassist.config.settings import load_params
    from emassist.pipeline import evaluate as evaluate_step
    from emassist.pipeline import register as register_step
    from emassist.pipeline import train as train_step
    from tests.servers import tracking_uri_env

    cwd = Path.cwd()
    os.chdir(repo)
    try:
        with tracking_uri_env(world.tracking_uri):
            params = load_params("params.yaml")
            world.run_id = train_step.main(params).run_id  # type: ignore[attr-defined]
            evaluate_step.main(params)
            report = register_step.main(params)
    finally:
        os.chdir(cwd)
    world.version = report["version"]  # type: ignore[attr-defined]
    assert report["decision"] == "promoted"
    return world


def test_repro_ingests_the_bucket_and_logs_artifacts_to_s3(built: World) -> None:
    repo = built.repo
    manifest = pd.read_parquet(repo / "data/interim/manifest.parquet")
    rejected = pd.read_csv(repo / "data/interim/rejected.csv", keep_default_na=False)
    n_objects = built.n_seed + len(REFUSED_KEYS) + len(CORRUPT_KEYS)  # type: ignore[attr-defined]
    assert len(manifest) + len(rejected) == n_objects  # every object in the bucket lands somewhere
    reasons = dict(zip(rejected["source_path"], rejected["reason"], strict=True))
    assert "'..' segment" in reasons[f"s3://{BUCKET}/sem/raw/../../escape.png"]
    assert "empty path segment" in reasons[f"s3://{BUCKET}/sem/raw/Fibres//double.png"]
    assert "unknown class folder 'Nowhere'" in reasons[f"s3://{BUCKET}/sem/raw/Nowhere/x.png"]
    assert {"Tips/broken.tif", "Powder/readme.png"} <= set(reasons)
    assert not list(built.tmp.rglob("escape.png"))

    assert built.version == "1"  # type: ignore[attr-defined]
    run_id = json.loads((repo / "models/run.json").read_text())["run_id"]
    assert run_id == built.run_id  # type: ignore[attr-defined]
    artifacts = built.keys("mlartifacts/")
    assert any(run_id in k and k.endswith("model.keras") for k in artifacts), artifacts[:20]
    assert any(k.endswith("MLmodel") for k in artifacts)
    assert not (repo / "mlartifacts").exists() and not (built.tmp / "mlflow" / "artifacts").exists()


def test_registered_model_loads_back_and_serves_from_s3(built: World) -> None:
    import mlflow

    from tests.servers import tracking_uri_env

    image = next((built.repo / "data/raw/Tips").glob("*.*")).read_bytes()
    frame = pd.DataFrame({"image": [b64(image)]})
    classes = yaml.safe_load((built.repo / "params.yaml").read_text())["data"]["classes"]
    with tracking_uri_env(built.tracking_uri):
        model = mlflow.pyfunc.load_model("models:/sem-classifier@champion")
        out = model.predict(frame)
        assert out.loc[0, "label"] in classes and out.loc[0, "error"] == ""
        with model_server("models:/sem-classifier@champion", built.tracking_uri, built.tmp) as url:
            payload = {"dataframe_split": {"columns": ["image"], "data": [[frame.loc[0, "image"]]]}}
            resp = requests.post(f"{url}/invocations", json=payload, timeout=60)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["predictions"][0]["label"] == out.loc[0, "label"]


def test_dvc_remote_on_s3_push_and_pull_into_a_fresh_clone(built: World) -> None:
    repo = built.repo
    out = ok(built.emassist("dvc-remote", repo, "s3", "dvc-remote", "--default"))
    assert f"dvc remote modify --local s3 endpointurl {built.moto.url}" in out
    local = (repo / ".dvc/config.local").read_text()
    assert f"url = s3://{BUCKET}/dvcstore" in local and built.moto.url in local
    assert "secret" not in local and "access_key" not in local
    assert built.moto.url not in (repo / ".dvc/config").read_text()  # machine-specific: not in git

    out = ok(built.dvc("push", repo, "push"))
    assert "pushed" in out
    assert built.keys("dvcstore/files/md5/")
    git_commit(repo, "pipeline outputs")
    clone = built.clone("clone")
    ok(built.dvc("pull", clone, "pull", *DVC_DATA))
    for rel in DVC_DATA:
        assert sha_tree(clone / rel) == sha_tree(repo / rel), rel
    assert len(sha_tree(clone / "data/interim/images")) > 50


def test_endpoint_killed_mid_push_then_retry_completes(built: World) -> None:
    from emassist.data.demo import generate_demo

    repo = built.repo
    extra = repo / "data" / "extra"
    n_extra, stop_after = 80, 10
    extra_demo = demo_params(n_images=n_extra, width=48, height=48, seed=7, min_per_class=8, tif_fraction=0.0,
                             databar_fraction=0.0)  # fmt: skip
    generate_demo(extra, extra_demo, progress=False)
    ok(built.dvc("add-extra", repo, "add", "data/extra"))
    git_commit(repo, "extra data")
    before = len(built.keys("dvcstore/"))
    uploaded = built.uploads("dvcstore/")
    # DVC tries every remaining file against a dead endpoint; fewer botocore attempts make it give up sooner.
    env = {**os.environ, **built.env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "AWS_MAX_ATTEMPTS": "2"}
    with open(built.logs / "push-interrupted.log", "w") as log:
        push = subprocess.Popen([sys.executable, "-m", "dvc", "push", "-j", "2"], cwd=repo, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while built.uploads("dvcstore/") < uploaded + stop_after:  # some, not all, of the new files are up
                assert push.poll() is None, "push finished before the endpoint could be stopped"
                assert time.monotonic() < deadline, "push made no progress"
                time.sleep(0.1)
            stop_process(built.moto.proc)  # the endpoint goes away in the middle of the push
            rc = push.wait(300)
        finally:
            if push.poll() is None:
                push.kill()
    message = (built.logs / "push-interrupted.log").read_text()
    assert rc != 0
    assert "ERROR: failed to push data to the cloud" in message and "files failed to upload" in message
    assert f'Could not connect to the endpoint URL: "{built.moto.url}' in message

    recording = built.tmp / "moto-recording.jsonl"
    built.moto = start_moto(built.tmp, built.env, port=built.moto.port, recording=recording)
    assert replay_recording(built.moto, recording) <= 1  # the objects stored before the kill are back (at most the
    # request cut short by the kill is lost), as they would be in a real store
    kept = len(built.keys("dvcstore/"))
    assert before + stop_after <= kept < before + n_extra + 1
    out = ok(built.dvc("push-retry", repo, "push", "-j", "4"))
    pushed = int(re.search(r"(\d+) files? pushed", out).group(1))  # type: ignore[union-attr]
    assert pushed == before + n_extra + 1 - kept  # only what was missing, not everything again
    assert len(built.keys("dvcstore/")) == before + n_extra + 1  # the new files + the folder's .dir object

    clone = built.clone("clone-after-kill")
    ok(built.dvc("pull-after-kill", clone, "pull", *DVC_DATA, "data/extra"))
    for rel in (*DVC_DATA, "data/extra"):
        assert sha_tree(clone / rel) == sha_tree(repo / rel), rel


def test_secret_is_in_no_file_written(built: World) -> None:
    """The fake AWS secret was in every process's environment; no file any of them wrote contains it: the repository
    copy and clones (params, dvc config, dvc.lock, data, models, reports), MLflow's database and server log, DVC's
    site caches, moto's logs, command outputs, and every object in the bucket (data, DVC store, MLflow artifacts)."""
    import mlflow

    from tests.servers import tracking_uri_env

    needle = built.secret.encode()
    assert built.env["AWS_SECRET_ACCESS_KEY"] == built.secret
    scanned, leaks = 0, []
    for path in built.tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            if needle in path.read_bytes():
                leaks.append(str(path.relative_to(built.tmp)))
    client = built.client()
    keys = built.keys("")
    for key in keys:
        if needle in client.get_object(Bucket=BUCKET, Key=key)["Body"].read():
            leaks.append(f"s3://{BUCKET}/{key}")
    assert scanned > 500 and len(keys) > 300
    assert not leaks, leaks
    with tracking_uri_env(built.tracking_uri):
        for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
            values = [*run.data.params.values(), *run.data.tags.values()]
            assert not [v for v in values if built.secret in v]
