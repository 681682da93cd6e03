from ._annotator import CALIBRATIONS, METHODS, TreeAnnotator
from ._markers import NEGATIVES, TypeMarkers, negative_sample, one_vs_rest_markers

__all__ = [
    "CALIBRATIONS",
    "METHODS",
    "NEGATIVES",
    "TreeAnnotator",
    "TypeMarkers",
    "negative_sample",
    "one_vs_rest_markers",
]
