"""Where a model's training data came from: the source, its version, and whether it is synthetic.

Shipped with every registered model (``training_data`` in its serving config) so that every place a user sees an
answer (the page's header, ``emassist predict``, the model card) can say what the model was trained on, and warn
when it was trained on the synthetic demo images, which it does not know real micrographs from.

The data version is the one every training run is tagged with (:func:`emassist.model.tracking.data_version`: DVC's
hash of the splits in ``dvc.lock``, else our hash of the split files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emassist.config.settings import Params
from emassist.model.tracking import data_version

SYNTHETIC_SOURCES = frozenset({"demo"})
UNKNOWN = "unknown"
DEMO_NOTICE = (
    "Trained on synthetic demo images: not meant for real micrographs. Its labels for real SEM images are "
    "mostly wrong; train on the NFFA-EUROPE data (profiles/gpu.yaml) for real use."
)


def training_data(params: Params) -> dict[str, Any]:
    """``{"source", "version", "synthetic", "notice"}`` of the data ``params`` train on (``notice``: "" unless
    synthetic)."""
    source = params.data.source
    synthetic = source in SYNTHETIC_SOURCES
    return {
        "source": source,
        "version": data_version(Path(params.data.splits_dir))["data_version"],
        "synthetic": synthetic,
        "notice": DEMO_NOTICE if synthetic else "",
    }


def describe_training_data(config: dict[str, Any]) -> tuple[str, str]:
    """(one line naming the training data, the notice or "") from a serving config; a model registered before
    this existed says so."""
    info = config.get("training_data")
    if not isinstance(info, dict):
        return "training data: not recorded (a model registered before provenance was shipped)", ""
    line = f"training data: {info.get('source', UNKNOWN)} (version {str(info.get('version', UNKNOWN))[:12]})"
    return line, str(info.get("notice") or "")
