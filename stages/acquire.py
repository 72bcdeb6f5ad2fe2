"""acquire: produce data/raw/<Class>/ — synthetic demo images, or the real NFFA-EUROPE dataset."""

import sys

from emassist.pipeline.acquire import main
from emassist.pipeline.stagerun import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("acquire", __doc__ or "", main))
