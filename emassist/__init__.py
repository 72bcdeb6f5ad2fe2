"""Electron Microscope Assistant: SEM morphology classification and its ML pipeline."""

__version__ = "0.1.0"
