"""The names of the files the train stage writes under ``models/`` (one place: training, evaluation, registry).

``dvc.yaml`` declares the same paths as the train stage's outs.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path("models")
MODEL_FILE = MODEL_DIR / "model.keras"  # the serving copy (architecture + weights, no optimizer state)
RUN_FILE = MODEL_DIR / "run.json"  # {"run_id", "tracking_uri"} of the training's MLflow run
HISTORY_FILE = MODEL_DIR / "history.json"  # per-epoch metrics of both phases and the phase boundaries
CURVES_FILE = MODEL_DIR / "training_curves.png"
# written by the evaluate stage: {"temperature": T fitted on val, "ece_before", ..., "review_threshold", ...}
CALIBRATION_FILE = MODEL_DIR / "calibration.json"
# written by the evaluate stage: class means, shared precision matrix and threshold of the familiarity score
FAMILIARITY_FILE = MODEL_DIR / "familiarity.npz"
