"""Class name → scene renderer, and the class-independent random magnification."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from emassist.config.classes import CLASSES
from emassist.data.demo._raster import log_uniform
from emassist.data.demo.shapes import (
    Scene,
    render_biological,
    render_fibres,
    render_nanowires,
    render_particles,
    render_powder,
)
from emassist.data.demo.surfaces import render_films, render_mems, render_patterned, render_porous_sponge, render_tips

Renderer = Callable[[np.random.Generator, int, int, float], Scene]

RENDERERS: dict[str, Renderer] = {
    "Biological": render_biological,
    "Fibres": render_fibres,
    "Films_Coated_Surface": render_films,
    "MEMS_devices_and_electrodes": render_mems,
    "Nanowires": render_nanowires,
    "Particles": render_particles,
    "Patterned_surface": render_patterned,
    "Porous_Sponge": render_porous_sponge,
    "Powder": render_powder,
    "Tips": render_tips,
}
assert tuple(RENDERERS) == CLASSES, "every class needs a renderer, in CLASSES order"

# Magnification range (relative). Drawn identically for every class, so feature size in pixels is a
# product of the class's physical size distribution and a shared random zoom.
MAG_RANGE = (0.75, 1.4)


def render_scene(class_name: str, rng: np.random.Generator, height: int, width: int) -> Scene:
    """Height map (pixels) and albedo for one image of ``class_name``."""
    u = min(height, width) / 256.0 * log_uniform(rng, *MAG_RANGE)
    return RENDERERS[class_name](rng, height, width, u)
