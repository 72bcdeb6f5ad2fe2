"""acquire: produce data/raw/<Class>/ — synthetic demo images, or the real NFFA-EUROPE dataset."""

from __future__ import annotations

import sys
from pathlib import Path

from emassist.settings import Params
from emassist.stagerun import run_stage


def main(params: Params) -> None:
    raw_dir = Path(params.data.raw_dir)
    if params.data.source == "demo":
        from emassist.demo import generate_demo

        d = params.demo
        counts = generate_demo(
            raw_dir,
            n_images=d.n_images,
            width=d.width,
            height=d.height,
            seed=d.seed,
            min_per_class=d.min_per_class,
            tif_fraction=d.tif_fraction,
            databar_fraction=d.databar_fraction,
        )
        print(f"generated {sum(counts.values())} demo images in {raw_dir}: {counts}")
    else:
        from emassist.fetch import fetch_nffa

        n = params.nffa
        report = fetch_nffa(
            raw_dir,
            base_url=n.base_url,
            download_dir=Path(n.download_dir),
            classes=params.data.classes,
            retries=n.retries,
            timeout_s=n.timeout_s,
        )
        print(report)


if __name__ == "__main__":
    sys.exit(run_stage("acquire", __doc__ or "", main))
