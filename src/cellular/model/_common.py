"""Names shared by the model's modules."""

from __future__ import annotations

SAME_AS_TRAINING = "same-as-training"


class NotTrainedError(ValueError):
    """Raised when an untrained model (or a model without the needed head) is asked for results."""
