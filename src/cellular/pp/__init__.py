from ._genes import highly_variable_genes
from ._normalize import normalize_log1p

__all__ = ["highly_variable_genes", "normalize_log1p"]
