from ._genes import default_n_top_genes, highly_variable_genes
from ._normalize import normalize_log1p

__all__ = ["default_n_top_genes", "highly_variable_genes", "normalize_log1p"]
