from ._annotate import cellular_annotate
from ._embed import cellular_embed
from ._map import cellular_map, join_reference_query
from ._novel import novel_types
from ._representations import cell_type_representations

__all__ = [
    "cell_type_representations",
    "cellular_annotate",
    "cellular_embed",
    "cellular_map",
    "join_reference_query",
    "novel_types",
]
