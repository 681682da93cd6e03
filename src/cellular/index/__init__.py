from ._exact import exact_knn
from ._reference import LabelTransfer, ReferenceIndex
from ._transfer import ClassEvidence, calibrate_votes, neighbor_weights, smoothed_vote_logits, vote

__all__ = [
    "ClassEvidence",
    "LabelTransfer",
    "ReferenceIndex",
    "calibrate_votes",
    "exact_knn",
    "neighbor_weights",
    "smoothed_vote_logits",
    "vote",
]
