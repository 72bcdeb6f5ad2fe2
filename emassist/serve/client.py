"""THE HTTP client for a running ``mlflow models serve`` of the SEM classifier (the only code that builds
``/invocations`` requests: the command line, the web page's endpoint backend and ``serving/client.py`` use it).

    python -m emassist.serve.client --url http://127.0.0.1:5000 image1.tif image2.png

Library use::

    from emassist.serve.client import SemClient
    client = SemClient("http://127.0.0.1:5000")
    frame = client.predict_files(["a.tif", "b.png"])   # path, label, confidence, <class>..., error
    tiles = client.predict_bytes(pngs, standardized=True)  # already standardized: no data-bar search
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import requests

from emassist.data.preprocess import STANDARDIZED_PARAM

#: ``send``: base64 images → the prediction frame; raises :class:`ServingError` when the whole batch is refused.
SendFn = Callable[[list[str]], pd.DataFrame]


class ServingError(RuntimeError):
    """The server refused a request (``status`` is the HTTP status, ``message`` its explanation)."""

    def __init__(self, status: int, message: str, error_code: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.error_code = error_code


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_file(path: str | os.PathLike[str]) -> str:
    """Base64 of a file's bytes, as the ``image`` column expects."""
    return encode_bytes(Path(path).read_bytes())


def payload(
    images_b64: Sequence[str], *, standardized: bool = False, pixel_sizes: Sequence[float] | None = None
) -> dict[str, Any]:
    """The JSON body of a request for these base64 images (``standardized``: the model's inference parameter;
    ``pixel_sizes``: the ``pixel_size_nm`` column of a scale-aware model, nm per pixel of each image sent)."""
    if pixel_sizes is None:
        body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in images_b64]}}
    else:
        rows = [[b, float(nm)] for b, nm in zip(images_b64, pixel_sizes, strict=True)]
        body = {"dataframe_split": {"columns": ["image", "pixel_size_nm"], "data": rows}}
    if standardized:
        body["params"] = {STANDARDIZED_PARAM: True}
    return body


class SemClient:
    def __init__(self, base_url: str = "http://127.0.0.1:5000", *, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> SemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ health

    def ping(self) -> bool:
        try:
            return self.session.get(f"{self.base_url}/ping", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Block until ``/ping`` answers 200; raise TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(interval)
        raise TimeoutError(f"{self.base_url} did not answer /ping within {timeout:.0f} s")

    # ------------------------------------------------------------------------------------------ predict

    def predict_base64(
        self, images_b64: Sequence[str], *, standardized: bool = False, pixel_sizes: Sequence[float] | None = None
    ) -> pd.DataFrame:
        """One request; raises :class:`ServingError` on a 4xx/5xx answer.

        ``standardized``: the images are already standardized (tiles): the model only resizes them.
        ``pixel_sizes``: nm per pixel of each image sent (a scale-aware model; None: it reads the files' own).
        """
        body = payload(images_b64, standardized=standardized, pixel_sizes=pixel_sizes)
        response = self.session.post(f"{self.base_url}/invocations", json=body, timeout=self.timeout)
        return parse_response(response)

    def predict_bytes(
        self, images: Sequence[bytes], *, standardized: bool = False, pixel_sizes: Sequence[float] | None = None
    ) -> pd.DataFrame:
        return self.predict_base64([encode_bytes(b) for b in images], standardized=standardized,
                                   pixel_sizes=pixel_sizes)  # fmt: skip

    def predict_files(self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 32) -> pd.DataFrame:
        """Predict files in batches; a file the server rejects (or that cannot be read) gets an ``error`` row."""
        return predict_in_batches(paths, self.predict_base64, batch_size=batch_size)


def _error_frame(path: str, error: str) -> pd.DataFrame:
    return pd.DataFrame({"path": [path], "label": [""], "confidence": [0.0], "error": [error]})


def predict_in_batches(paths: Sequence[str | os.PathLike[str]], send: SendFn, *, batch_size: int = 32) -> pd.DataFrame:
    """Files → one prediction row each (``path`` first), ``batch_size`` base64 images per ``send``.

    A file that cannot be read gets an ``error`` row; a batch refused as a whole (4xx) is retried one file at a
    time so that each file gets its own reason; a 5xx stops. ``send`` is :meth:`SemClient.predict_base64` or an
    in-process pyfunc's predict (``emassist.serve.predict``).
    """
    frames = []
    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        good: list[tuple[str, str]] = []
        for path in chunk:
            try:
                good.append((path, encode_file(path)))
            except OSError as exc:
                frames.append(_error_frame(path, f"unreadable: {exc.strerror or exc}"))
        if not good:
            continue
        try:
            frame = send([e for _, e in good])
            frame.insert(0, "path", [p for p, _ in good])
            frames.append(frame)
        except ServingError as exc:
            if exc.status >= 500:
                raise
            if len(good) == 1:
                frames.append(_error_frame(good[0][0], exc.message))
                continue
            # Every image of the batch was rejected: ask one by one for each file's own reason.
            for path, enc in good:
                try:
                    frame = send([enc])
                    frame.insert(0, "path", [path])
                except ServingError as one:
                    if one.status >= 500:
                        raise
                    frame = _error_frame(path, one.message)
                frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["path", "label", "confidence", "error"])
    out = pd.concat(frames, ignore_index=True)
    if "error" in out.columns:
        out["error"] = out["error"].fillna("")
    return out


def parse_response(response: requests.Response) -> pd.DataFrame:
    """The predictions of a 200 answer as a DataFrame; :class:`ServingError` with the server's message otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        if isinstance(body, dict) and "message" in body:
            raise ServingError(response.status_code, str(body["message"]), str(body.get("error_code", "")))
        raise ServingError(response.status_code, response.text[:500] or response.reason)
    if not isinstance(body, dict) or "predictions" not in body:
        raise ServingError(response.status_code, f"unexpected answer: {response.text[:200]!r}")
    return pd.DataFrame(body["predictions"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emassist.serve.client",
        description="Send image files to a running `mlflow models serve` of the SEM classifier; print labels.",
    )
    parser.add_argument("files", nargs="+", type=Path, help="image files (PNG, JPEG, TIFF incl. 16-bit, BMP, ...)")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="server base URL (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per request (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write all columns to this CSV")
    args = parser.parse_args(argv)
    with SemClient(args.url) as client:
        try:
            frame = client.predict_files(args.files, batch_size=args.batch_size)
        except (ServingError, requests.RequestException) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for row in frame.itertuples(index=False):
        if getattr(row, "error", ""):
            print(f"{row.path}: ERROR {row.error}")
        else:
            print(f"{row.path}: {row.label} ({row.confidence:.3f})")
    if args.out:
        frame.to_csv(args.out, index=False)
    return 0 if not frame["error"].astype(bool).any() else 3


if __name__ == "__main__":
    sys.exit(main())
