from ._calibration import expected_calibration_error
from ._conformal import benjamini_hochberg, conformal_pvalues

__all__ = ["benjamini_hochberg", "conformal_pvalues", "expected_calibration_error"]
