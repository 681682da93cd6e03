from ._history import training_history

__all__ = ["training_history"]
