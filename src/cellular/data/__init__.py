from ._collection import CollectionMatrix, read_collection
from ._datasets import data_dir, pbmc68k_reduced_lognorm, read_shared_dataset
from ._expression import (
    DepthThinning,
    GeneAlignment,
    NormalizedExpression,
    align_genes,
    check_expression_values,
    read_expression,
)
from ._features import GeneFeatures
from ._finite import check_finite_embedding
from ._hierarchies import (
    LINEAGE_MAPS,
    HierarchicalPrediction,
    LabelHierarchy,
    ancestors,
    hierarchy_from_columns,
    lineage_map,
)
from ._layout import GENE_LAYOUTS, gene_grid_layout, grid_neighbour_correlation, grid_side
from ._moments import BatchMoments, BatchStandardization
from ._sampling import epoch_minibatches, n_epoch_minibatches, sequential_minibatches, stratified_split
from ._synthetic import synthetic_counts, synthetic_embedding, write_synthetic_h5ad

__all__ = [
    "GENE_LAYOUTS",
    "LINEAGE_MAPS",
    "ancestors",
    "BatchMoments",
    "BatchStandardization",
    "CollectionMatrix",
    "DepthThinning",
    "GeneAlignment",
    "GeneFeatures",
    "HierarchicalPrediction",
    "LabelHierarchy",
    "NormalizedExpression",
    "align_genes",
    "check_expression_values",
    "check_finite_embedding",
    "data_dir",
    "epoch_minibatches",
    "gene_grid_layout",
    "hierarchy_from_columns",
    "grid_neighbour_correlation",
    "grid_side",
    "lineage_map",
    "n_epoch_minibatches",
    "pbmc68k_reduced_lognorm",
    "read_collection",
    "read_expression",
    "read_shared_dataset",
    "sequential_minibatches",
    "stratified_split",
    "synthetic_counts",
    "synthetic_embedding",
    "write_synthetic_h5ad",
]
