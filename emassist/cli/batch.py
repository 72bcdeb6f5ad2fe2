"""``emassist batch``: command-line wiring (filled in by its issue)."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    """Register the command on the ``emassist`` subparsers (none yet)."""
