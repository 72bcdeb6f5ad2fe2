"""train: fit the model named in params (simple_cnn | xception), tracked in MLflow; writes models/."""

from __future__ import annotations

import sys

from emassist.config.settings import Params
from emassist.pipeline.stagerun import run_stage


def main(params: Params) -> None:
    from emassist.model.training import train

    result = train(params)
    print(
        f"MLflow run {result.run_id}: {sum(len(v) for k, v in result.history.items() if k == 'loss')} epochs "
        f"in {result.seconds:.0f} s ({result.images_per_second:.1f} images/s)"
    )


if __name__ == "__main__":
    sys.exit(run_stage("train", __doc__ or "", main))
