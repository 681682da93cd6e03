from ._exact import exact_knn
from ._reference import LabelTransfer, ReferenceIndex
from ._transfer import neighbor_weights, vote

__all__ = ["LabelTransfer", "ReferenceIndex", "exact_knn", "neighbor_weights", "vote"]
