"""augment: grow the rare classes of the train split with augmented copies (val/test untouched)."""

from __future__ import annotations

import sys
from pathlib import Path

from emassist.config.settings import Params
from emassist.pipeline.stagerun import run_stage


def main(params: Params) -> None:
    from emassist.data.augment import write_augmented

    a = params.augment
    splits = Path(params.data.splits_dir)
    out = write_augmented(
        splits / "train.csv",
        splits.parent / "augmented",
        target_per_class=a.target_per_class,
        seed=a.seed,
        policy=a.policy.as_dict(),
    )
    print(f"augmented training list: {out}")


if __name__ == "__main__":
    sys.exit(run_stage("augment", __doc__ or "", main))
