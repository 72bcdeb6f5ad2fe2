"""The allowed values and limits of the settings: one owner for every constant that params.yaml is checked against.

:mod:`emassist.config.settings` validates params.yaml against these (once, at load); the code that uses a setting
(the model builders, the augmentation, the demo generator) imports the same names instead of keeping its own copy,
so a value that passes ``load_params`` is one the code can use. Plain Python: importing this pulls in nothing heavy.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------------ data

DATA_SOURCES: tuple[str, ...] = ("demo", "nffa", "s3")

# ------------------------------------------------------------------------------------------------------ demo

DEMO_MIN_SIDE = 32  # the smallest generated image the scene renderers draw sensibly
DEMO_MAX_SIDE = 8192

# ------------------------------------------------------------------------------------------------ augmentation

POLICY_SWITCHES: tuple[str, ...] = ("flip", "rot90")  # on/off keys of an augmentation policy
POLICY_FRACTIONS: tuple[str, ...] = (  # keys holding a fraction in [0, 1], as in Keras' preprocessing layers
    "rotation",
    "width_shift",
    "height_shift",
    "shear",
    "zoom",
    "brightness",
    "contrast",
)
POLICY_KEYS: tuple[str, ...] = (
    "rotation",
    "width_shift",
    "height_shift",
    "shear",
    "zoom",
    "flip",
    "rot90",
    "brightness",
    "contrast",
)

# ----------------------------------------------------------------------------------------------------- models

MODEL_NAMES: tuple[str, ...] = ("simple_cnn", "compact_cnn", "xception")
MIN_IMAGE_SIZE: dict[str, int] = {
    # simple_cnn's two valid 3x3 convolutions and one pooling would run from 8 px; 16 px is the floor of every
    # model (below it an SEM image shows nothing of its class).
    "simple_cnn": 16,
    "compact_cnn": 32,  # a stride-2 stem and four 2x poolings leave 1x1 at 32 px
    "xception": 71,  # the smallest input keras.applications.Xception accepts
}
PRETRAINED_MODELS: tuple[str, ...] = ("xception",)  # the only models that take train.weights
WEIGHTS_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")  # local weights files (.h5 / .weights.h5)
XCEPTION_BLOCKS = 14  # blocks of keras.applications.Xception; train.finetune_blocks unfreezes the top 1..14
OPTIMIZERS: tuple[str, ...] = ("rmsprop", "adam", "sgd")
LR_SCHEDULES: tuple[str, ...] = ("plateau", "cosine")
#: The pixel sizes (nm) a scale-aware model takes (a request's ``pixel_size_nm``; outside: HTTP 400): an SEM pixel
#: is neither 1 pm nor 1 mm (the same range ingest's data-bar reading calls plausible).
MIN_PIXEL_SIZE_NM = 0.01
MAX_PIXEL_SIZE_NM = 1e6

# --------------------------------------------------------------------------------------------------- split

EMBEDDING_BACKBONES: tuple[str, ...] = ("xception", "mobilenet_v2")  # frozen backbones of the embedding grouping
MIN_EMBEDDING_SIZE: dict[str, int] = {"xception": 71, "mobilenet_v2": 32}  # keras.applications' smallest inputs

# ------------------------------------------------------------------------------------------------------ serve

WEBAPP_SOURCES: tuple[str, ...] = ("registry", "endpoint")
MIN_TILE = 16  # smallest tile side of a tile scan, in pixels
