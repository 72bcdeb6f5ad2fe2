"""``emassist monitor ...``: see add_commands (filled in by issue 14)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register this module's commands (none yet)."""
