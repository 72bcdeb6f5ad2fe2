"""The augment step: grow the rare classes of the train split with augmented copies (val/test untouched)."""

from __future__ import annotations

from pathlib import Path

from emassist.config.settings import Params
from emassist.data.augment import write_augmented


def main(params: Params) -> None:
    a = params.augment
    out = write_augmented(
        Path(params.data.splits_dir) / "train.csv",
        Path(params.data.augmented_dir),
        target_per_class=a.target_per_class,
        seed=a.seed,
        policy=a.policy,
    )
    print(f"augmented training list: {out}")
