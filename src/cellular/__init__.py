"""CELLULAR: contrastive cell embeddings, annotation and novel cell-type detection for scverse.

Subpackages and the top-level names are imported on first use (PEP 562), so ``import cellular`` and the
``cellular`` command start without importing torch, scvi-tools, scanpy or pynndescent.
"""

from importlib import import_module
from importlib.metadata import version

__version__ = version("cellular-sc")

_SUBPACKAGES = (
    "data",
    "dataloaders",
    "index",
    "lm",
    "metrics",
    "model",
    "module",
    "nn",
    "pl",
    "pp",
    "tl",
    "train",
    "trees",
)
_NAMES = {"CELLULAR": "model", "NotTrainedError": "model", "ReferenceIndex": "index"}

__all__ = [
    "CELLULAR",
    "NotTrainedError",
    "ReferenceIndex",
    "__version__",
    *sorted(set(_SUBPACKAGES) - {"model", "module"}),
]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return import_module(f"{__name__}.{name}")
    if name in _NAMES:
        value = getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES, *_NAMES})
