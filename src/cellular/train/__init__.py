from ._callbacks import EpochProgressBar, RestoreBestWeights
from ._distributed import gather_minibatch
from ._plans import CellularTrainingPlan, ClassifierTrainingPlan, warmup_cosine
from ._quiet import quiet_lightning

__all__ = [
    "CellularTrainingPlan",
    "ClassifierTrainingPlan",
    "EpochProgressBar",
    "RestoreBestWeights",
    "gather_minibatch",
    "quiet_lightning",
    "warmup_cosine",
]
