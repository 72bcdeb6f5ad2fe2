"""Deterministic synthetic SEM images of the ten NFFA morphology classes (demo data without a download).

``generate_demo(out_dir, ...)`` writes ``out_dir/<Class>/L2_<hex>.{jpg,png,tif}`` like the real dataset.
"""

from emassist.data.demo.generate import class_counts, generate_demo

__all__ = ["class_counts", "generate_demo"]
