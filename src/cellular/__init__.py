"""CELLULAR: contrastive cell embeddings, annotation and novel cell-type detection for scverse."""

from importlib.metadata import version

from . import data, metrics, nn, pl, pp, tl
from .model import CELLULAR, NotTrainedError

__version__ = version("cellular-sc")

__all__ = ["CELLULAR", "NotTrainedError", "__version__", "data", "metrics", "nn", "pl", "pp", "tl"]
