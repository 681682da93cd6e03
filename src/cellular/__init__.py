"""CELLULAR: contrastive cell embeddings, annotation and novel cell-type detection for scverse."""

from importlib.metadata import version

from . import data, dataloaders, index, lm, metrics, nn, pl, pp, tl, train, trees
from .index import ReferenceIndex
from .model import CELLULAR, NotTrainedError

__version__ = version("cellular-sc")

__all__ = [
    "CELLULAR",
    "NotTrainedError",
    "ReferenceIndex",
    "__version__",
    "data",
    "dataloaders",
    "index",
    "lm",
    "metrics",
    "nn",
    "pl",
    "pp",
    "tl",
    "train",
    "trees",
]
