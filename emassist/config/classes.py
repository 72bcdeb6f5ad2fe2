"""The ten morphology classes of the NFFA-EUROPE SEM dataset (Aversa et al., Sci Data 2018)."""

CLASSES: tuple[str, ...] = (
    "Biological",
    "Fibres",
    "Films_Coated_Surface",
    "MEMS_devices_and_electrodes",
    "Nanowires",
    "Particles",
    "Patterned_surface",
    "Porous_Sponge",
    "Powder",
    "Tips",
)

# Image counts per class in the real dataset (the original write-up), used for demo class ratios.
NFFA_COUNTS: dict[str, int] = {
    "Biological": 973,
    "Fibres": 163,
    "Films_Coated_Surface": 328,
    "MEMS_devices_and_electrodes": 4593,
    "Nanowires": 3821,
    "Particles": 3926,
    "Patterned_surface": 4756,
    "Porous_Sponge": 182,
    "Powder": 915,
    "Tips": 1626,
}
