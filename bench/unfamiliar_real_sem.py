"""How well the familiarity score tells the demo model's own test images from real micrographs.

    python bench/unfamiliar_real_sem.py                       # after `dvc repro`, in the repository root
    python bench/unfamiliar_real_sem.py --real ../shared/real_sem --params params.yaml

Loads the pipeline's model as it is served (``models/model.keras`` with ``models/calibration.json`` and
``models/familiarity.npz``, through the pyfunc's own preprocessing), scores the test split (in-distribution) and
every image file under ``--real`` (real SEM micrographs the demo model was never trained on), and prints:

* the AUROC of ``unfamiliar_score`` separating the two (1.0: every real image scores above every test image),
* the share of each set flagged ``unfamiliar`` and ``needs_review``, their mean calibrated confidence,
* one line per real file: its label, confidence, score and flags, or why it was refused (featureless frames
  are refused before scoring and so left out of the AUROC).

Not a speed benchmark: it measures what a user sees when they hand the demo model a real micrograph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}


def load_model(params_file: Path):  # -> SemClassifier
    from emassist.config.settings import load_params
    from emassist.model.files import CALIBRATION_FILE, FAMILIARITY_FILE, MODEL_FILE
    from emassist.model.registry import serving_config
    from emassist.serve.pyfunc import SemClassifier

    params = load_params(params_file)
    for path in (MODEL_FILE, FAMILIARITY_FILE):
        if not path.is_file():
            sys.exit(f"error: {path} not found: run `dvc repro` (the train and evaluate stages) first")
    config = serving_config(params, CALIBRATION_FILE)
    return params, SemClassifier.from_files(MODEL_FILE, config, FAMILIARITY_FILE)


def summarise(name: str, model, proba: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    confidence = proba.max(axis=1)
    reviews = [model.review(float(c), float(s)) for c, s in zip(confidence, scores, strict=True)]
    return {
        "set": name,
        "n": len(scores),
        "unfamiliar": float(np.mean([r[1] for r in reviews])) if reviews else float("nan"),
        "needs_review": float(np.mean([r[0] for r in reviews])) if reviews else float("nan"),
        "confidence": float(confidence.mean()) if len(confidence) else float("nan"),
        "score_median": float(np.median(scores)) if len(scores) else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("--real", type=Path, default=REPO.parent / "shared" / "real_sem",
                        help="folder of real micrographs (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.real.is_dir():
        sys.exit(f"error: {args.real} is not a folder of real micrographs (pass --real)")

    from emassist.data.dataset import read_split
    from emassist.data.decode import ImageRejected
    from emassist.model.familiarity import auroc

    params, model = load_model(args.params)
    split = read_split(Path(params.data.splits_dir) / "test.csv", params.data.classes)
    from PIL import Image

    test_gray = np.stack([np.asarray(Image.open(p).convert("L")) for p in split.paths])
    test_gray = np.stack([model.preprocessor.resize(g) for g in test_gray])
    test_proba, test_scores = model.score(test_gray)

    real_rows, real_gray = [], []
    for path in sorted(p for p in args.real.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            real_gray.append(model.standardized_bytes(path))
            real_rows.append((path.name, ""))
        except ImageRejected as exc:
            real_rows.append((path.name, exc.reason))
    kept = [name for name, reason in real_rows if not reason]
    real_proba, real_scores = model.score(np.stack(real_gray)) if real_gray else (np.zeros((0, 1)), np.zeros(0))

    rows = [summarise("demo test split", model, test_proba, test_scores),
            summarise("real micrographs", model, real_proba, real_scores)]  # fmt: skip
    print(f"model trained on: {model.training_data or 'not recorded'}")
    print(f"{'set':<18} {'n':>5} {'unfamiliar':>11} {'needs_review':>13} {'mean conf':>10} {'median score':>13}")
    for r in rows:
        print(f"{r['set']:<18} {r['n']:>5} {r['unfamiliar']:>11.1%} {r['needs_review']:>13.1%} "
              f"{r['confidence']:>10.3f} {r['score_median']:>13.2f}")  # fmt: skip
    print(f"AUROC of unfamiliar_score (demo test vs real): {auroc(test_scores, real_scores):.3f}")
    print()
    scored = dict(zip(kept, range(len(kept)), strict=True))
    for name, reason in real_rows:
        if reason:
            print(f"  {name}: refused ({reason.split(':')[0]})")
            continue
        k = scored[name]
        label = model.classes[int(real_proba[k].argmax())]
        needs, unfamiliar, _ = model.review(float(real_proba[k].max()), float(real_scores[k]))
        flags = ", ".join(f for f, on in (("unfamiliar", unfamiliar), ("needs review", needs)) if on) or "accepted"
        print(f"  {name}: {label} {real_proba[k].max():.2f}, score {real_scores[k]:.1f} ({flags})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
