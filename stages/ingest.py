"""ingest: decode every raw image, crop the data bar, cache 8-bit PNGs, quarantine what cannot be read."""

import sys

from emassist.pipeline.ingest import main
from emassist.pipeline.stagerun import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("ingest", __doc__ or "", main))
