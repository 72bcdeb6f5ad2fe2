"""The evaluate step: held-out test metrics, confusion matrix and most-confused pairs; reports/ and MLflow."""

from __future__ import annotations

from typing import Any

from emassist.config.settings import Params
from emassist.data.dataset import DatasetError
from emassist.model.testset import evaluate
from emassist.pipeline.stagerun import StageError


def main(params: Params) -> dict[str, Any]:
    try:
        return evaluate(params)
    except DatasetError as exc:
        raise StageError(str(exc)) from exc
