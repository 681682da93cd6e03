from ._annotation import confusion_matrix, f1_per_type
from ._embedding import embedding
from ._history import training_history
from ._markers import marker_importances
from ._novelty import novelty_histogram

__all__ = [
    "confusion_matrix",
    "embedding",
    "f1_per_type",
    "marker_importances",
    "novelty_histogram",
    "training_history",
]
