from ._calibration import expected_calibration_error
from ._conformal import benjamini_hochberg, conformal_pvalues
from ._hierarchical import hierarchical_f1

__all__ = ["benjamini_hochberg", "conformal_pvalues", "expected_calibration_error", "hierarchical_f1"]
