"""The 28 HPA protein-localisation labels: one table for the whole package.

Counts are the Kaggle train.csv counts (31,072 samples, 50,782 labels), from
../shared/reference/hpa.md; the synthetic generator scales them, reports compare against them.
"""

from __future__ import annotations

NUM_LABELS = 28

# (name, count in the Kaggle train.csv)
_LABELS: tuple[tuple[str, int], ...] = (
    ("Nucleoplasm", 12885),
    ("Nuclear membrane", 1254),
    ("Nucleoli", 3621),
    ("Nucleoli fibrillar center", 1561),
    ("Nuclear speckles", 1858),
    ("Nuclear bodies", 2513),
    ("Endoplasmic reticulum", 1008),
    ("Golgi apparatus", 2822),
    ("Peroxisomes", 53),
    ("Endosomes", 45),
    ("Lysosomes", 28),
    ("Intermediate filaments", 1093),
    ("Actin filaments", 688),
    ("Focal adhesion sites", 537),
    ("Microtubules", 1066),
    ("Microtubule ends", 21),
    ("Cytokinetic bridge", 530),
    ("Mitotic spindle", 210),
    ("Microtubule organizing center", 902),
    ("Centrosome", 1482),
    ("Lipid droplets", 172),
    ("Plasma membrane", 3777),
    ("Cell junctions", 802),
    ("Mitochondria", 2965),
    ("Aggresome", 322),
    ("Cytosol", 8228),
    ("Cytoplasmic bodies", 328),
    ("Rods & rings", 11),
)

LABEL_NAMES: tuple[str, ...] = tuple(name for name, _ in _LABELS)
KAGGLE_TRAIN_COUNTS: tuple[int, ...] = tuple(count for _, count in _LABELS)
KAGGLE_TRAIN_SAMPLES = 31072

# Stain order everywhere in fasthpa: channel c of an image is CHANNELS[c].
CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")

assert len(LABEL_NAMES) == NUM_LABELS
