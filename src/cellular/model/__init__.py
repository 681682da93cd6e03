from ._common import SAME_AS_TRAINING, NotTrainedError
from ._inference import QueryEmbedding
from ._model import CELLULAR
from ._panels import PanelCalibration
from ._representations import cell_type_representations

__all__ = [
    "CELLULAR",
    "SAME_AS_TRAINING",
    "NotTrainedError",
    "PanelCalibration",
    "QueryEmbedding",
    "cell_type_representations",
]
