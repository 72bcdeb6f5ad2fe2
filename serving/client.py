"""Command line of the scoring-server client (the client itself is :mod:`emassist.serve.client`).

python -m serving.client --url http://127.0.0.1:5000 image1.tif image2.png
"""

from __future__ import annotations

import sys

from emassist.serve.client import SemClient, ServingError, main

__all__ = ["SemClient", "ServingError", "main"]

if __name__ == "__main__":
    sys.exit(main())
