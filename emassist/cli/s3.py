"""``emassist s3 pull | push | dvc-remote | mlflow-server``: data, the DVC remote and MLflow artifacts on S3.

Wired into ``emassist.cli.main`` with ``add_commands(sub)``.
Bucket, prefixes and endpoint come from the ``s3:`` section of
params.yaml (options override them); credentials only from the standard AWS chain.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

from emassist.config.settings import Params, S3Params, load_params
from emassist.data.s3 import S3Error, ensure_bucket, make_client, pull, push


def _s3_params(args: argparse.Namespace) -> tuple[Params, S3Params]:
    params = load_params(args.params)
    overrides = {k: v for k in ("bucket", "prefix", "endpoint_url") if (v := getattr(args, k, None)) is not None}
    s3 = dataclasses.replace(params.s3, **overrides)
    s3.check()
    return params, s3


def _cmd_pull(args: argparse.Namespace) -> int:
    params, s3 = _s3_params(args)
    try:
        report = pull(s3, args.out, params.data.classes, workers=args.workers, skip_unchanged=not args.force,
                      progress=not args.quiet)  # fmt: skip
    except S3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    _, s3 = _s3_params(args)
    try:
        client = make_client(s3, workers=args.workers)
        if args.create_bucket and ensure_bucket(client, str(s3.bucket)):
            print(f"created bucket {s3.bucket}")
        print(push(s3, args.src, client=client, workers=args.workers, progress=not args.quiet))
    except S3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def dvc_remote_commands(s3: S3Params, *, default: bool) -> list[list[str]]:
    """The ``dvc remote`` commands that configure the S3 remote in .dvc/config.local (machine-specific, not in git).
    No credentials: DVC takes them from the same AWS chain."""
    bucket = s3.require_bucket()
    name = s3.dvc_remote
    url = f"s3://{bucket}/{s3.dvc_prefix.strip('/')}".rstrip("/")
    cmds = [["dvc", "remote", "add", "--local", "--force", name, url]]
    settings = {"endpointurl": s3.resolved_endpoint_url(), "region": s3.region, "profile": s3.profile,
                "jobs": str(s3.dvc_jobs) if s3.dvc_jobs else None}  # fmt: skip
    for key, value in settings.items():
        if value:
            cmds.append(["dvc", "remote", "modify", "--local", name, key, value])
    if default:
        cmds.append(["dvc", "remote", "default", "--local", name])
    return cmds


def _cmd_dvc_remote(args: argparse.Namespace) -> int:
    _, s3 = _s3_params(args)
    for cmd in dvc_remote_commands(s3, default=args.default):
        print(shlex.join(cmd))
        if not args.print_only:
            result = subprocess.run([sys.executable, "-m", "dvc", *cmd[1:]], capture_output=True, text=True)
            if result.returncode != 0:
                print(f"error: {shlex.join(cmd)} failed: {result.stderr.strip()}", file=sys.stderr)
                return 1
    if not args.print_only:
        print(f"DVC remote {s3.dvc_remote!r} written to .dvc/config.local; `dvc push -r {s3.dvc_remote}` / "
              f"`dvc pull -r {s3.dvc_remote}`" + (" (the default remote here)" if args.default else ""))  # fmt: skip
    return 0


def mlflow_server_command(
    s3: S3Params, *, backend_store_uri: str, host: str, port: int, workers: int
) -> tuple[list[str], dict[str, str]]:
    """``mlflow server`` with proxied artifacts at s3://bucket/mlflow_prefix, and the environment it needs
    (only the endpoint; credentials stay in the caller's AWS chain)."""
    bucket = s3.require_bucket()
    cmd = ["mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", f"s3://{bucket}/{s3.mlflow_prefix.strip('/')}".rstrip("/"),
           "--host", host, "--port", str(port), "--workers", str(workers)]  # fmt: skip
    env = {}
    if endpoint := s3.resolved_endpoint_url():
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    return cmd, env


def _cmd_mlflow_server(args: argparse.Namespace) -> int:
    _, s3 = _s3_params(args)
    cmd, env = mlflow_server_command(s3, backend_store_uri=args.backend_store_uri, host=args.host, port=args.port,
                                     workers=args.workers)  # fmt: skip
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]))
    if args.print_only:
        return 0
    exe = Path(sys.executable).with_name("mlflow")
    os.execve(str(exe), [str(exe), *cmd[1:]], {**os.environ, **env})
    return 0  # pragma: no cover - replaced by the server


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s3 = sub.add_parser(
        "s3",
        help="data, the DVC remote and MLflow artifacts on S3 (s3: section of params.yaml)",
        description="S3 (or MinIO, moto, ...) for the raw data, the DVC remote and MLflow artifacts. Credentials "
        "come only from the AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role.",
    )
    s3_sub = s3.add_subparsers(dest="s3_command", metavar="S3_COMMAND", required=True)

    def location(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bucket", help="bucket name (default: s3.bucket)")
        p.add_argument("--prefix", help="key prefix (default: s3.prefix)")
        p.add_argument("--endpoint-url", dest="endpoint_url", help="S3-compatible endpoint (default: s3.endpoint_url)")

    p = s3_sub.add_parser(
        "pull",
        help="download s3://bucket/prefix/<Class>/... into data/raw (checked, verified, parallel)",
        description="Download s3://bucket/prefix/<Class>/... into <out>/<Class>/...: paginated listing, parallel "
        "downloads with retries and backoff, size + MD5/SHA-256 checks; keys that would escape the data root or "
        "sit outside a class folder are refused and listed in <out>/_rejected_upstream.csv (ingest folds them into "
        "rejected.csv). Files already present with the same checksum are kept.",
    )
    location(p)
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder (default: data/raw)")
    p.add_argument("--workers", type=int, help="parallel downloads (default: s3.workers)")
    p.add_argument("--force", action="store_true", help="download every object, even unchanged local files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pull)

    p = s3_sub.add_parser(
        "push",
        help="upload data/raw/<Class>/... to s3://bucket/prefix/ (skips unchanged objects)",
        description="Upload <src>/<Class>/... to s3://bucket/prefix/<Class>/...; each PUT carries Content-MD5 and a "
        "SHA-256 checksum; objects already there with the same MD5 are skipped.",
    )
    location(p)
    p.add_argument("--src", type=Path, default=Path("data/raw"), help="input folder (default: data/raw)")
    p.add_argument("--workers", type=int, help="parallel uploads (default: s3.workers)")
    p.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_push)

    p = s3_sub.add_parser(
        "dvc-remote",
        help="configure the DVC remote s3://bucket/dvc_prefix in .dvc/config.local",
        description="Run `dvc remote add/modify --local` for s3://<s3.bucket>/<s3.dvc_prefix> with the endpoint, "
        "region, profile and jobs from params (machine-specific, so .dvc/config.local, which git ignores). "
        "No credentials are written: DVC uses the AWS chain.",
    )
    location(p)
    p.add_argument("--default", action="store_true", help="make it the default remote for dvc push/pull here")
    p.add_argument("--print", dest="print_only", action="store_true", help="only print the commands")
    p.set_defaults(func=_cmd_dvc_remote)

    p = s3_sub.add_parser(
        "mlflow-server",
        help="start an MLflow tracking server with artifacts on s3://bucket/mlflow_prefix",
        description="Run `mlflow server --artifacts-destination s3://<s3.bucket>/<s3.mlflow_prefix>` (proxied "
        "artifacts: clients need no S3 credentials), with MLFLOW_S3_ENDPOINT_URL from s3.endpoint_url.",
    )
    location(p)
    p.add_argument(
        "--backend-store-uri",
        default="sqlite:///mlflow.db",
        help="runs and registry database (default: sqlite:///mlflow.db; postgresql://... for a team)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--workers", type=int, default=2, help="server workers (default: 2)")
    p.add_argument("--print", dest="print_only", action="store_true", help="only print the command")
    p.set_defaults(func=_cmd_mlflow_server)
