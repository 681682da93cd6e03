from ._model import CELLULAR, NotTrainedError

__all__ = ["CELLULAR", "NotTrainedError"]
