from ._annotation import cell_type_representations
from ._common import SAME_AS_TRAINING, NotTrainedError
from ._model import CELLULAR, QueryEmbedding
from ._panels import PanelCalibration

__all__ = [
    "CELLULAR",
    "SAME_AS_TRAINING",
    "NotTrainedError",
    "PanelCalibration",
    "QueryEmbedding",
    "cell_type_representations",
]
