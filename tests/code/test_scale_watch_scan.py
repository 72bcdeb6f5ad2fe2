"""A scale-aware model (issue 15 part 2) in the watcher and in ``emassist scan``: the file's pixel size read from its
TIFF tags reaches the model (the answers equal the pyfunc's for the same file, and differ from the size withheld),
and the results say which size was used (of the file, of the model input) and where it came from. The watcher's
endpoint path sends each PNG's own pixel size (the server scales it back to the model input's). A model without
the scale input: tests/code/test_watch.py and tests/code/test_cli.py, unchanged."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.code.test_scale_serving import _fei_tiff, _png
from tests.code.test_scale_webapp import CLASSES, _classifier, _local
from tests.code.test_watch import _jsonl, _params, _run_once
from tests.helpers import b64, texture

pytest.importorskip("keras")

NM = 2.0  # the TIFF's pixel size (its FEI tags)
H, W = 256, 512  # the files' size: the model input (32 px) of the whole file is W * NM / 32 = 32 nm per pixel
SIZE = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _classifier(tmp_path_factory.mktemp("scale_watch"), size=SIZE)


def _files(root: Path) -> dict[str, Path]:
    """A TIFF with its pixel size in its tags, a PNG without one, and a file that is no image (old mtimes: ripe)."""
    root.mkdir(parents=True, exist_ok=True)
    gray = texture(H, W, seed=3)
    files = {"tagged.tif": _fei_tiff(gray, NM), "plain.png": _png(gray), "notes.png": b"operator notes\n"}
    old = time.time() - 100
    for name, data in files.items():
        (root / name).write_bytes(data)
        os.utime(root / name, (old, old))
    return {name: root / name for name in files}


def test_the_watcher_gives_a_scale_aware_model_the_file_s_pixel_size(model: Any, tmp_path: Path) -> None:
    from emassist.pipeline.watch import Watcher, WatchOptions
    from emassist.pipeline.watch_outputs import SCALE_COLUMNS
    from emassist.pipeline.watch_scorer import Scorer

    files = _files(tmp_path / "microscope")
    scorer = Scorer(_local(model))
    assert scorer.scale_aware
    lines: list[str] = []
    watcher = Watcher(WatchOptions(folder=tmp_path / "microscope", out=tmp_path / "out", once=True), _params(),
                      scorer, say=lines.append)  # fmt: skip
    _run_once(watcher, timeout=60)
    records = {r["relpath"]: r for r in _jsonl(tmp_path / "out")}
    tagged, plain, notes = records["tagged.tif"], records["plain.png"], records["notes.png"]
    assert (tagged["status"], plain["status"], notes["status"]) == ("classified", "classified", "rejected")
    assert tagged["pixel_size_source"] == "tags" and tagged["pixel_size_nm"] == pytest.approx(NM)
    assert tagged["model_pixel_size_nm"] == pytest.approx(NM * W / SIZE)
    assert plain["pixel_size_source"] == "unknown" and plain["pixel_size_nm"] is None
    assert (notes["pixel_size_nm"], notes["model_pixel_size_nm"], notes["pixel_size_source"]) == (None, None, "")
    # the size reached the model: the pyfunc's own answer for the file, not the one with the size withheld
    served = model.predict(None, pd.DataFrame({"image": [b64(files["tagged.tif"].read_bytes())]}))
    probs = [tagged["probabilities"][c] for c in CLASSES]
    np.testing.assert_allclose(probs, served[CLASSES].iloc[0], atol=1e-5)
    withheld = model.score(model.prepare(str(files["tagged.tif"]), file=True).image[None])[0][0]
    assert not np.allclose(probs, withheld, atol=1e-4)
    assert any("tagged.tif" in line and f"{NM:g} nm/px from tags" in line for line in lines), lines
    with open(tmp_path / "out" / "results.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[-3:] == list(SCALE_COLUMNS)
    by_path = {Path(r["path"]).name: r for r in rows}
    assert by_path["tagged.tif"]["pixel_size_source"] == "tags"
    assert float(by_path["tagged.tif"]["model_pixel_size_nm"]) == pytest.approx(NM * W / SIZE)
    assert by_path["plain.png"]["pixel_size_nm"] == "" and by_path["notes.png"]["pixel_size_source"] == ""


class _InProcessTransport:
    """The scoring client's part of an endpoint, without the HTTP: the request frame the client would send
    (:func:`emassist.serve.client.payload`) answered by the same pyfunc ``mlflow models serve`` runs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.requests: list[pd.DataFrame] = []

    def predict_bytes(self, images: list[bytes], *, standardized: bool = False,
                      pixel_sizes: list[float] | None = None) -> pd.DataFrame:  # fmt: skip
        from emassist.serve.client import payload

        body = payload([b64(b) for b in images], standardized=standardized, pixel_sizes=pixel_sizes)
        split = body["dataframe_split"]
        frame = pd.DataFrame(split["data"], columns=split["columns"])
        self.requests.append(frame)
        return self.model.predict(None, frame, params=body.get("params"))


def test_the_watcher_s_endpoint_path_sends_each_png_s_own_pixel_size(model: Any, tmp_path: Path) -> None:
    from emassist.config.settings import Params
    from emassist.pipeline.watch_scorer import Scorer
    from emassist.serve.backend import EndpointBackend, ModelInfo

    files = _files(tmp_path / "in")
    backend = EndpointBackend("http://127.0.0.1:1", Params(), ModelInfo("m", "3", "", "endpoint", "http://x"), 5.0,
                              model.config)  # fmt: skip
    transport = _InProcessTransport(model)
    backend.client = transport  # type: ignore[assignment]
    scorer = Scorer(backend)
    assert not scorer.local and scorer.scale_aware
    prepared = scorer.prepare([str(files["plain.png"]), str(files["tagged.tif"])])
    frame = scorer.answer(prepared)
    assert list(frame["pixel_size_source"]) == ["unknown", "tags"]
    assert frame["pixel_size_nm"].iloc[1] == pytest.approx(NM) and np.isnan(frame["pixel_size_nm"].iloc[0])
    assert frame["model_pixel_size_nm"].iloc[1] == pytest.approx(NM * W / SIZE)
    # two requests: the known size as the PNG's own (file width over the cached PNG's), the unknown one without it
    sent = {tuple(r.columns): r for r in transport.requests}
    cache = model.preprocessor.cache_size
    assert list(sent[("image", "pixel_size_nm")]["pixel_size_nm"]) == pytest.approx([NM * W / cache])
    assert len(sent[("image",)]) == 1
    local = Scorer(_local(model)).answer(prepared)
    np.testing.assert_allclose(frame[CLASSES].to_numpy(), local[CLASSES].to_numpy(), atol=1e-5)
    assert list(local["pixel_size_source"]) == ["unknown", "tags"]


def _scan(tmp_path: Path, model_file: Path, image: Path, *extra: str) -> tuple[int, str, str]:
    from emassist.cli.main import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"classes": CLASSES}, "train": {"model": "compact_cnn", "image_size": SIZE},
        "ingest": {"cache_size": 64, "max_pixels": 4_000_000, "min_side": 16},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "monitoring": {"log_predictions": False},
    }))  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            argv = [
                "--params",
                str(params),
                "scan",
                str(image),
                "--class",
                CLASSES[0],
                "--model",
                str(model_file),
                "--tile",
                "128",
                "--stride",
                "128",
                "--no-progress",
                "--no-log",
                "--out",
                str(tmp_path / "h.png"),
            ]
            code = main([*argv, *extra])  # fmt: skip
        except SystemExit as exc:  # argparse refusing an option
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_emassist_scan_gives_each_tile_the_image_s_pixel_size(tmp_path: Path) -> None:
    model_file = _classifier_file(tmp_path)
    tiff = tmp_path / "overview.tif"
    tiff.write_bytes(_fei_tiff(texture(H, W, seed=3), NM))
    code, out, err = _scan(tmp_path, model_file, tiff, "--csv", str(tmp_path / "tags.csv"))
    assert code == 0, err
    tile_nm = NM * 128 / SIZE  # each 128-px tile squashed to the 32-px model input
    assert f"pixel size: {NM:g} nm/px (source: tags); each tile's model input {tile_nm:g} nm/px" in out, out
    code, out, err = _scan(tmp_path, model_file, tiff, "--pixel-size-nm", str(NM), "--csv", str(tmp_path / "told.csv"))
    assert code == 0 and "(source: request)" in out, err
    assert (tmp_path / "told.csv").read_text() == (tmp_path / "tags.csv").read_text()  # the same size, same scores
    code, out, err = _scan(tmp_path, model_file, tiff, "--pixel-size-nm", "500", "--csv", str(tmp_path / "far.csv"))
    assert code == 0 and "500 nm/px (source: request)" in out
    assert (tmp_path / "far.csv").read_text() != (tmp_path / "tags.csv").read_text()  # the size reaches the model
    plain = tmp_path / "plain.png"
    plain.write_bytes(_png(texture(H, W, seed=3)))
    code, out, err = _scan(tmp_path, model_file, plain)
    assert code == 0 and "pixel size: unknown" in out, out


BAD_SIZES = [("-1", "is not positive"), ("0", "is not positive"), ("nan", "NaN"), ("5e7", "outside the plausible"),
             ("x", "not a number")]  # fmt: skip


@pytest.mark.parametrize(("value", "why"), BAD_SIZES)
def test_emassist_scan_refuses_a_bad_pixel_size(tmp_path: Path, value: str, why: str) -> None:
    tiff = tmp_path / "overview.tif"
    tiff.write_bytes(_fei_tiff(texture(64, 64, seed=1), NM))
    code, _, err = _scan(tmp_path, tmp_path / "never-loaded.keras", tiff, "--pixel-size-nm", value)
    assert code == 2 and "--pixel-size-nm" in err and why in err, err


def _classifier_file(tmp_path: Path) -> Path:
    """A scale-aware .keras file like the fixture's (same builder, seed and size)."""
    from emassist.model.builders import build_model
    from emassist.model.saving import save_serving_copy

    return Path(save_serving_copy(build_model("compact_cnn", num_classes=len(CLASSES), image_size=SIZE,
                                              scale_input=True, seed=5), tmp_path / "scan-model.keras"))  # fmt: skip
