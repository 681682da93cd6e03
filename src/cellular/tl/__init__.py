from ._annotate import cellular_annotate
from ._embed import cellular_embed
from ._lm import cell_sentences, lm_embed
from ._map import cellular_map, join_reference_query
from ._novel import novel_types
from ._representations import cell_type_representations
from ._trees import marker_importances, tree_annotate

__all__ = [
    "cell_sentences",
    "cell_type_representations",
    "cellular_annotate",
    "cellular_embed",
    "cellular_map",
    "join_reference_query",
    "lm_embed",
    "marker_importances",
    "novel_types",
    "tree_annotate",
]
