"""The train step: fit the model named in params, tracked in MLflow; writes models/."""

from __future__ import annotations

from emassist.config.settings import Params
from emassist.data.dataset import DatasetError
from emassist.model.training import TrainResult, train
from emassist.pipeline.stagerun import StageError


def main(params: Params) -> TrainResult:
    try:
        result = train(params)
    except DatasetError as exc:
        raise StageError(str(exc)) from exc
    epochs = sum(len(v) for k, v in result.history.items() if k == "loss")
    print(
        f"MLflow run {result.run_id}: {epochs} epochs in {result.seconds:.0f} s "
        f"({result.images_per_second:.1f} images/s)"
    )
    return result
