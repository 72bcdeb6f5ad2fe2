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

#: Nanometres per world unit of each class's scenes: a log-uniform range, drawn per image independently of the
#: rendering. The renderers draw their features in world units (``u`` pixels each), the same in pixels as before
#: the demo had physical sizes; this factor gives those features realistic physical sizes, and the image's pixel
#: size is ``nm_per_unit / u``. The sizes each range gives are in the comments (the world sizes are the renderers'
#: draws, times 0.75–1.4 in pixels at 256 px). Look-alike pairs in pixels differ here (nanowires vs fibres,
#: particles vs powder) while the ranges of the other classes overlap them, so the pixel size alone does not classify.
NM_PER_UNIT: dict[str, tuple[float, float]] = {
    "Biological": (60.0, 300.0),  # cells 36–150 units: 2–45 µm; bacteria 5–12 units thick: 0.3–3.6 µm
    "Fibres": (100.0, 800.0),  # diameters 7–24 units (woven: 4–23): 0.4–19 µm
    "Films_Coated_Surface": (1.5, 60.0),  # grains 7–30 units: 10 nm–1.8 µm; nodules, cracks likewise
    "MEMS_devices_and_electrodes": (300.0, 1500.0),  # fingers 2–8 units: 0.6–12 µm; pads 25–90 units: 8–135 µm
    "Nanowires": (3.0, 25.0),  # diameters 3–8 units: 9–200 nm
    "Particles": (0.7, 30.0),  # diameters 8–32 units: 6 nm–1 µm
    "Patterned_surface": (7.0, 400.0),  # pitches 14–50 units: 100 nm–20 µm
    "Porous_Sponge": (10.0, 1000.0),  # pores and struts 9–45 units: 90 nm–45 µm (foams, sponges, scaffolds)
    "Powder": (100.0, 1000.0),  # grains 6–100 units across: 0.6–100 µm
    "Tips": (4.0, 100.0),  # apex radii 0.5–5 units: 2–500 nm; pyramids 40–150 units: 0.2–15 µm
}
assert tuple(NM_PER_UNIT) == CLASSES, "every class needs a physical scale, in CLASSES order"


def pixels_per_unit(rng: np.random.Generator, height: int, width: int) -> float:
    """``u``, the scene's pixels per world unit: resolution × a random magnification (the same for every class).

    It is the first draw of an image's random stream, so the pixel size can be had without rendering.
    """
    return min(height, width) / 256.0 * log_uniform(rng, *MAG_RANGE)


def render_scene(class_name: str, rng: np.random.Generator, height: int, width: int, u: float) -> Scene:
    """Height map (pixels) and albedo for one image of ``class_name`` at ``u`` pixels per world unit."""
    return RENDERERS[class_name](rng, height, width, u)
