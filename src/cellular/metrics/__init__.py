from ._calibration import expected_calibration_error
from ._conformal import benjamini_hochberg, conformal_pvalues
from ._hierarchical import consistency_penalty, hierarchical_f1

__all__ = [
    "benjamini_hochberg",
    "conformal_pvalues",
    "consistency_penalty",
    "expected_calibration_error",
    "hierarchical_f1",
]
