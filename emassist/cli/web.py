"""``emassist web`` (the page for microscopists) and ``emassist scan`` (a tile scan of one large image).

Wired into ``emassist.cli.main`` with ``add_commands(sub)``; each command reads ``args.params``
and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emassist.config.settings import load_params

# The commands import the serving/registry modules inside their functions: those pull in MLflow (seconds), and
# `emassist --help` and the other commands should not wait for it.


def _backend(args: argparse.Namespace, params: Any) -> Any:
    from emassist.serve.backend import load_backend

    return load_backend(params, model_uri=args.model, endpoint_url=args.endpoint)


def _cmd_web(args: argparse.Namespace) -> int:
    from emassist.serve.backend import BackendError
    from serving.webapp.app import serve

    params = load_params(args.params)
    watch = None
    if args.watch is not None:
        from emassist.pipeline.watch import WatchOptions

        if not args.watch.is_dir():
            print(f"error: --watch {args.watch}: not a folder", file=sys.stderr)
            return 2
        alert = [c.strip() for c in (args.watch_alert or "").split(",") if c.strip()]
        watch = WatchOptions(folder=args.watch, out=args.watch_out, poll=args.watch_poll, alert=alert)
    try:
        serve(params, args.host, args.port, model_uri=args.model, endpoint_url=args.endpoint, watch=watch)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    from emassist.data.decode import ImageRejected, probe_image
    from emassist.serve import tilescan
    from emassist.serve.backend import BackendError

    params = load_params(args.params)
    if args.model is None and args.class_name not in params.data.classes:  # before loading anything
        print(f"error: --class: unknown class {args.class_name!r} (known: {', '.join(params.data.classes)})",
              file=sys.stderr)  # fmt: skip
        return 2
    cfg = params.webapp
    tile = args.tile or cfg.tile_size
    stride = args.stride or cfg.tile_stride
    try:
        tilescan.check_options(tile, stride)
    except tilescan.ScanError as exc:
        print(f"error: --{exc}", file=sys.stderr)
        return 2
    try:  # a file that is no image at all is refused before the model loads (its header alone says so)
        probe_image(args.image, max_pixels=params.ingest.max_pixels)
    except ImageRejected as exc:
        print(f"error: {args.image}: {exc.reason}", file=sys.stderr)
        return 1
    try:
        backend = _backend(args, params)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:  # decoded once, with the model's own limits; its preprocessor crops the data bar once in the scan
        decoded = backend.preprocessor.decode(args.image)
    except ImageRejected as exc:
        print(f"error: {args.image}: {exc.reason}", file=sys.stderr)
        return 1
    if args.class_name not in backend.classes:
        print(f"error: --class: unknown class {args.class_name!r} (the model knows: {', '.join(backend.classes)})",
              file=sys.stderr)  # fmt: skip
        return 2
    scale = _scan_pixel_size(args, backend, decoded)  # None: a model without the scale input
    try:
        result = tilescan.scan(
            decoded.gray,
            backend.probabilities,
            backend.classes,
            tile=tile,
            stride=stride,
            preprocessor=backend.preprocessor,
            batch_size=args.batch_size or cfg.tile_batch,
            max_tiles=cfg.max_tiles,
            progress=False if args.no_progress else None,
            scale=scale,
        )
    except ImageRejected as exc:  # e.g. a featureless (blank) overview
        print(f"error: {args.image}: {exc.reason}", file=sys.stderr)
        return 1
    except tilescan.ScanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tilescan.write_outputs(decoded.gray, result, args.class_name, args.out, args.csv)
    if params.monitoring.log_predictions and not args.no_log:
        _log_scan(params, args.image, decoded, result, backend)
    k = result.class_index(args.class_name)
    grid = result.scores[:, :, k]
    r, c = divmod(int(grid.argmax()), grid.shape[1])
    print(
        f"{args.image}: {result.n_tiles} tiles ({len(result.xs)}x{len(result.ys)}) of {result.tile} px, stride "
        f"{stride}, in {result.seconds:.1f} s with {backend.info.label}; {args.class_name}: max {grid.max():.3f} "
        f"at x={result.xs[c]} y={result.ys[r]}, mean {grid.mean():.3f}; wrote {args.out}"
        + (f" and {args.csv}" if args.csv else "")
    )
    if scale is not None:
        print(scan_pixel_line(result, scale))
    return 0


def _scan_pixel_size(args: argparse.Namespace, backend: Any, decoded: Any) -> Any:
    """The full image's pixel size for a scale-aware model (a :class:`~emassist.model.scale.ScaleUsed`): the checked
    ``--pixel-size-nm``, else read as the page reads it (tags, else the data bar, else unknown); None for a model
    without the scale input (``--pixel-size-nm`` is then ignored, with a note)."""
    from emassist.model.scale import ScaleUsed

    if not backend.scale_aware:
        if args.pixel_size_nm is not None:
            print("note: --pixel-size-nm ignored: this model takes no pixel size", file=sys.stderr)
        return None
    if args.pixel_size_nm is not None:
        return ScaleUsed.of(args.pixel_size_nm, "request", decoded.width, int(backend.preprocessor.image_size or 0))
    return backend.read_pixel_size(decoded, backend.preprocessor.crop(decoded.gray)[1])


def scan_pixel_line(result: Any, scale: Any) -> str:
    """What ``emassist scan`` says of the pixel size a scale-aware model used for the tiles."""
    if result.tile_pixel_size_nm is None:
        why = f": {scale.reason}" if scale.reason else ""
        return f"pixel size: unknown{why} (the tiles were scored without it)"
    return (f"pixel size: {result.pixel_size_nm:.4g} nm/px (source: {result.pixel_size_source}); each tile's model "
            f"input {result.tile_pixel_size_nm:.4g} nm/px")  # fmt: skip


def _pixel_size_arg(text: str) -> float:
    """``--pixel-size-nm``: a plausible pixel size, or the reason it is none."""
    from emassist.model.scale import pixel_size_problem

    problem = pixel_size_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return float(text)


def scan_summary(result: Any) -> tuple[str, float, dict[str, float]]:
    """What the prediction log keeps of a tile scan: ``(label, confidence, probabilities)`` where the
    probabilities are each class's MEAN score over all tiles (they sum to 1, as each tile's do), the label the
    class with the highest mean and the confidence that mean. The class mapped by ``--class`` plays no part: the
    row says what the overview as a whole looks like to the model."""
    import numpy as np

    mean = np.asarray(result.scores, dtype=np.float64).reshape(-1, len(result.classes)).mean(axis=0)
    best = int(mean.argmax())
    return result.classes[best], float(mean[best]), {c: float(mean[k]) for k, c in enumerate(result.classes)}


def _log_scan(params: Any, image: Path, decoded: Any, result: Any, backend: Any) -> None:
    """Write ONE ``scan`` row for the overview (its file's sha256, size/format/SEM metadata, brightness/contrast
    of the cropped, resized overview, and :func:`scan_summary`); review by the model's policy on the summary's
    confidence (no familiarity check: tiles are not whole images). A store that is down: one warning on stderr."""
    # lazy, as the rest of this module's model-side imports: `emassist --help` does not need them
    from emassist.data.hashing import file_sha256
    from emassist.data.predlog import PredictionLog, PredictionLogError
    from emassist.model.selective import ReviewPolicy
    from emassist.serve.predlog_hooks import ImageFacts, ModelIdentity, prediction_row

    label, confidence, probabilities = scan_summary(result)
    policy = ReviewPolicy.served(backend.config)
    pre = backend.preprocessor
    rows = result.databar_rows  # the scan cropped the data bar once already: no second search
    overview = pre.resize(decoded.gray[: decoded.gray.shape[0] - rows] if rows else decoded.gray)
    info = backend.info
    row = prediction_row(
        "scan",
        ImageFacts.of(file_sha256(image), decoded, overview),
        ModelIdentity(info.name, info.version, info.alias),
        label=label,
        confidence=confidence,
        probabilities=probabilities,
        needs_review=policy.decide(confidence)[0],
        origin=str(image),
    )
    db_uri = params.monitoring.resolved_db_uri()
    try:
        store = PredictionLog(db_uri)
        try:
            store.write([row])
        finally:
            store.dispose()
    except PredictionLogError as exc:
        print(f"warning: {exc}; the scan is not logged (--no-log skips the log)", file=sys.stderr)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="use this model instead of webapp.source: models:/NAME@ALIAS, models:/NAME/VERSION, a model folder "
        "or a .keras file",
    )
    p.add_argument(
        "--endpoint", metavar="URL", help="call this running `mlflow models serve` (webapp.source: endpoint)"
    )


def add_commands(sub: Any) -> None:
    """Add ``web`` and ``scan`` to an ``add_subparsers()`` object."""
    p = sub.add_parser(
        "web",
        help="start the web page: upload, classify, explain (Grad-CAM), scan a large image",
        description=(
            "Serve the microscopist's page. The model comes from webapp.source in params.yaml: 'registry' loads "
            "models:/<mlflow.registered_model>@<webapp.alias> (MLFLOW_TRACKING_URI wins over mlflow.tracking_uri), "
            "'endpoint' calls a running `mlflow models serve` at webapp.endpoint_url. The page answers at once and "
            "says 'loading the model…' while the model loads in the background (/api/health: 503 'loading', then 200 "
            "'ok'); a model that cannot be loaded leaves the page up saying why; one that is not there at all (no "
            "such model in the registry, no such file, no model server) ends the command with status 1."
        ),
        epilog="Example: emassist web --port 8000, then open http://127.0.0.1:8000/",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    _model_options(p)
    p.add_argument("--watch", type=Path, metavar="DIR",
                   help="also watch DIR as `emassist watch` does (same model); arrivals on the Live tab")  # fmt: skip
    p.add_argument("--watch-out", type=Path, metavar="OUT", help="the watcher's results folder (default: DIR-emassist)")
    p.add_argument("--watch-poll", action="store_true", help="the watcher lists DIR every watch.poll_interval_s "
                   "instead of file-system events (network shares)")  # fmt: skip
    p.add_argument("--watch-alert", metavar="CLASS[,CLASS]",
                   help="classes the Live tab highlights (at or above watch.min_confidence)")  # fmt: skip
    p.set_defaults(func=_cmd_web)

    p = sub.add_parser(
        "scan",
        help="classify overlapping tiles of a large image; write a heat map PNG of one class and a CSV of tiles",
        description=(
            "Needle in a haystack: cut IMAGE (data bar cropped) into TILE-pixel tiles every STRIDE pixels, classify "
            "each through the serving path, and write a heat map of CLASS over the image and every tile's scores. "
            "When monitoring.log_predictions is true, ONE row is appended to the prediction log for the overview: "
            "the class with the highest mean tile score, that mean as its confidence, every class's mean."
        ),
        epilog="Example: emassist scan overview.tif --class Particles --tile 256 --stride 128 --out heat.png "
        "--csv tiles.csv",
    )
    p.add_argument("image", type=Path, metavar="IMAGE", help="the overview image (TIFF, PNG, JPEG, ...)")
    p.add_argument("--class", dest="class_name", required=True, metavar="CLASS", help="class to map, e.g. Particles")
    p.add_argument("--tile", type=int, help="tile side in pixels (default: webapp.tile_size)")
    p.add_argument("--stride", type=int, help="pixels between tiles (default: webapp.tile_stride)")
    p.add_argument("--out", type=Path, default=Path("heatmap.png"), help="heat map PNG (default: %(default)s)")
    p.add_argument("--csv", type=Path, help="CSV of tile scores (default: none)")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass (default: webapp.tile_batch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-log", action="store_true",
                   help="do not append the scan's summary to the prediction log (monitoring.db_uri)")  # fmt: skip
    p.add_argument("--pixel-size-nm", type=_pixel_size_arg, metavar="NM",
                   help="nm per pixel of IMAGE, for a scale-aware model (default: its TIFF tags, else its data bar, "
                   "else unknown); each tile gets it scaled to its model input")  # fmt: skip
    _model_options(p)
    p.set_defaults(func=_cmd_scan)
