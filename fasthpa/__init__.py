"""fasthpa: fast, trustworthy training of protein-localisation classifiers on HPA images."""

from fasthpa.labels import CHANNELS, LABEL_NAMES, NUM_LABELS

__version__ = "0.1.0"
__all__ = ["CHANNELS", "LABEL_NAMES", "NUM_LABELS", "__version__"]
