"""Offline oversampling of the rare classes of the train split (val/test are never read here).

Every class of the train list with fewer than ``target_per_class`` rows is grown to exactly that many by
writing augmented copies of its images; larger classes are left as they are (no downsampling). The
augmentation policy uses the same keys and fractions as Keras' preprocessing layers (and as the online
augmentation of training), so ``rotation: 0.1`` means up to ±0.1 of a full turn (±36°).

Everything is deterministic: the order in which a class's images are cycled comes from ``(seed, label)``
and the transform of each copy from ``(source sha256, copy index, seed)``, which is also the copy's id.

The policy (:class:`emassist.config.settings.PolicyParams`) and the target were validated by ``load_params``; what
is checked here is the data: the train list's columns and that its images exist and can be read.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from emassist.config.settings import PolicyParams
from emassist.core.atomic import atomic_open, atomic_path

REQUIRED_COLUMNS: tuple[str, ...] = ("sha256", "label", "image_path")
AUGMENTED_FROM = "augmented_from"
_SUPPORTED_MODES = ("L", "RGB")
_MIN_VIEW = 0.1  # smallest zoom view (fraction of the image); keeps the affine invertible for zoom=1


def copy_id(source_sha256: str, copy_index: int, seed: int) -> str:
    """Id (hex sha256) of augmented copy ``copy_index`` of ``source_sha256`` under ``seed``; also its file name."""
    return hashlib.sha256(f"{source_sha256}:{copy_index}:{seed}".encode()).hexdigest()


def augment_image(image: Image.Image, policy: PolicyParams, rng: np.random.Generator) -> Image.Image:
    """One random augmentation of ``image`` (same size and mode); parameters drawn from ``rng``.

    The geometric part (rotation, quarter turns, shear, zoom, shift, flips) is a single affine map sampled with bicubic
    interpolation from a symmetrically padded copy, so corners are filled with mirrored content
    (Keras' ``fill_mode="reflect"``) rather than black. A zero policy returns the pixels unchanged.
    """
    if image.mode not in _SUPPORTED_MODES:
        raise ValueError(f"unsupported image mode {image.mode!r} (expected one of {', '.join(_SUPPORTED_MODES)})")
    # Always draw the same numbers in the same order, so one key's value never reshuffles the others.
    u_rot, u_wx, u_hy, u_shear, u_zoom, u_bright, u_contrast = rng.uniform(-1.0, 1.0, size=7)
    flip_h, flip_v = rng.random(2) < 0.5
    quarter_turns = int(rng.integers(4))

    width, height = image.size
    theta = u_rot * policy.rotation * 2.0 * math.pi + (quarter_turns * math.pi / 2.0 if policy.rot90 else 0.0)
    shear = u_shear * policy.shear
    view = max(1.0 + u_zoom * policy.zoom, _MIN_VIEW)  # > 1: zoom out (see more), < 1: zoom in
    shift = np.array([u_wx * policy.width_shift * width, u_hy * policy.height_shift * height])
    fx = -1.0 if policy.flip and flip_h else 1.0
    fy = -1.0 if policy.flip and flip_v else 1.0

    # Forward map about the image centre c: out = L @ (in - c) + c + shift, with L = R · Shear · Zoom · Flip.
    cos, sin = math.cos(theta), math.sin(theta)
    rotation = np.array([[cos, -sin], [sin, cos]])
    shearing = np.array([[1.0, shear], [0.0, 1.0]])
    zooming = np.eye(2) / view
    flipping = np.diag([fx, fy])
    forward = rotation @ shearing @ zooming @ flipping

    pixels = np.asarray(image)
    if not (np.array_equal(forward, np.eye(2)) and not shift.any()):
        pixels = _affine(pixels, np.linalg.inv(forward), shift)

    contrast = 1.0 + u_contrast * policy.contrast
    brightness = u_bright * policy.brightness * 255.0
    if contrast != 1.0 or brightness != 0.0:
        values = pixels.astype(np.float32)
        mean = values.mean(axis=(0, 1), keepdims=True)
        values = (values - mean) * np.float32(contrast) + mean + np.float32(brightness)
        pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels))  # uint8: L or RGB


def _affine(pixels: np.ndarray, inverse: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Apply ``in = inverse @ (out - c - shift) + c`` to ``pixels`` with mirrored fill outside the image."""
    height, width = pixels.shape[:2]
    centre = np.array([width / 2.0, height / 2.0])
    offset = centre - inverse @ (centre + shift)
    corners = np.array([[0.0, 0.0], [width, 0.0], [0.0, height], [width, height]])
    mapped = corners @ inverse.T + offset
    margin = 3  # room for the bicubic kernel
    left = max(0, math.ceil(-mapped[:, 0].min())) + margin
    right = max(0, math.ceil(mapped[:, 0].max() - width)) + margin
    top = max(0, math.ceil(-mapped[:, 1].min())) + margin
    bottom = max(0, math.ceil(mapped[:, 1].max() - height)) + margin
    pad = [(top, bottom), (left, right)] + [(0, 0)] * (pixels.ndim - 2)
    padded = np.pad(pixels, pad, mode="symmetric")  # d c b a | a b c d | d c b a, as Keras' "reflect"
    a, b = inverse[0]
    d, e = inverse[1]
    data = (a, b, offset[0] + left, d, e, offset[1] + top)
    out = Image.fromarray(padded).transform(
        (width, height), Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC
    )
    return np.asarray(out)


def oversample(
    train: pd.DataFrame,
    out_dir: Path,
    *,
    target_per_class: int,
    seed: int,
    policy: PolicyParams,
    root: Path = Path("."),
    progress: bool = True,
) -> pd.DataFrame:
    """Grow every class of ``train`` below ``target_per_class`` rows to exactly that many with augmented copies.

    The copies are written to ``out_dir/images/<id>.png`` (``out_dir`` is replaced atomically as a whole).
    Returns the original rows (unchanged, in order) followed by the new ones, with an extra column
    ``augmented_from`` (the source's sha256; empty for originals). A new row copies its source row except
    ``sha256`` (the copy's id, see :func:`copy_id`), ``image_path`` (the new file, relative to ``root``) and
    ``source_path`` (the source's, suffixed ``#aug<k>``). Source images are read from ``root / image_path``.
    """
    with atomic_path(out_dir) as tmp:
        return _oversample_into(
            train,
            tmp,
            Path(out_dir),
            target_per_class=target_per_class,
            seed=seed,
            policy=policy,
            root=Path(root),
            progress=progress,
        )


def write_augmented(
    train_csv: Path,
    out_dir: Path,
    *,
    target_per_class: int,
    seed: int,
    policy: PolicyParams,
    root: Path = Path("."),
    progress: bool = True,
) -> Path:
    """Read the train split ``train_csv``, oversample it into ``out_dir`` and write ``out_dir/train.csv``.

    ``out_dir`` (images and list together) is replaced atomically. Returns the path of the new list.
    """
    train_csv = Path(train_csv)
    if not train_csv.is_file():
        raise FileNotFoundError(f"{train_csv}: train split not found (run `dvc repro split`)")
    train = pd.read_csv(train_csv, keep_default_na=False)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        frame = _oversample_into(
            train,
            tmp,
            out_dir,
            target_per_class=target_per_class,
            seed=seed,
            policy=policy,
            root=Path(root),
            progress=progress,
        )
        with atomic_open(tmp / "train.csv", "w", newline="") as fh:
            frame.to_csv(fh, index=False)
    return out_dir / "train.csv"


def _check_frame(train: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in train.columns]
    if missing:
        raise ValueError(f"train split: column(s) {missing} missing (found: {', '.join(map(str, train.columns))})")
    if AUGMENTED_FROM in train.columns:
        raise ValueError(f"train split: already has an '{AUGMENTED_FROM}' column; oversample the raw train split")


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def _class_seed(seed: int, label: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{label}".encode()).digest()[:8], "big")


def _oversample_into(
    train: pd.DataFrame,
    write_dir: Path,
    out_dir: Path,
    *,
    target_per_class: int,
    seed: int,
    policy: PolicyParams,
    root: Path,
    progress: bool,
) -> pd.DataFrame:
    """Write the copies under ``write_dir/images``; rows point at ``out_dir/images`` (where they end up)."""
    _check_frame(train)

    originals = train.reset_index(drop=True)
    for image_path in originals["image_path"]:
        if not (root / str(image_path)).is_file():
            raise FileNotFoundError(f"{image_path}: source image not found (looked at {root / str(image_path)})")

    # Plan: which source row each new copy comes from, and its copy index.
    plan: list[tuple[str, int, int]] = []  # (label, row position of the source, copy index)
    copies_of: dict[str, int] = {}  # copies made per source sha256 (unique ids even if a sha sits in 2 classes)
    labels = originals["label"].astype(str)
    for label in sorted(labels.unique()):
        positions = np.flatnonzero((labels == label).to_numpy())
        needed = target_per_class - len(positions)
        if needed <= 0:
            continue
        first_by_sha: dict[str, int] = {}
        for pos in positions:
            first_by_sha.setdefault(str(originals.at[pos, "sha256"]), int(pos))
        shas = sorted(first_by_sha)
        order = np.random.default_rng(_class_seed(seed, label)).permutation(len(shas))
        for j in range(needed):
            sha = shas[order[j % len(shas)]]
            k = copies_of.get(sha, 0)
            copies_of[sha] = k + 1
            plan.append((label, first_by_sha[sha], k))

    images_dir = write_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    final_images = out_dir / "images"
    ids: list[str] = []
    new_paths: list[str] = []
    suffixes: list[str] = []
    cache: dict[int, Image.Image] = {}  # decoded sources of the class being grown
    current = None
    with tqdm(total=len(plan), disable=not progress, unit="img", desc="augment", dynamic_ncols=True) as bar:
        for label, pos, k in plan:
            if label != current:
                cache.clear()
                current = label
            source_sha = str(originals.at[pos, "sha256"])
            if pos not in cache:
                image_path = str(originals.at[pos, "image_path"])
                try:
                    with Image.open(root / image_path) as im:
                        im.load()
                        cache[pos] = im.copy()
                except FileNotFoundError:
                    raise FileNotFoundError(f"{image_path}: source image not found") from None
                if cache[pos].mode not in _SUPPORTED_MODES:
                    raise ValueError(f"{image_path}: unsupported image mode {cache[pos].mode!r} (expected L)")
            new_id = copy_id(source_sha, k, seed)
            rng = np.random.default_rng(int(new_id, 16))
            augmented = augment_image(cache[pos], policy, rng)
            augmented.save(images_dir / f"{new_id}.png", format="PNG")
            ids.append(new_id)
            new_paths.append(_relative(final_images / f"{new_id}.png", root))
            suffixes.append(f"#aug{k}")
            bar.update()

    originals = originals.assign(**{AUGMENTED_FROM: ""})
    if not plan:
        return originals
    new = originals.iloc[[pos for _, pos, _ in plan]].reset_index(drop=True)
    new[AUGMENTED_FROM] = new["sha256"].astype(str)
    new["sha256"] = ids
    new["image_path"] = new_paths
    if "source_path" in new.columns:
        new["source_path"] = new["source_path"].astype(str) + pd.Series(suffixes)
    return pd.concat([originals, new], ignore_index=True)
