from ._annotate import cellular_annotate
from ._embed import cellular_embed
from ._novel import novel_types
from ._representations import cell_type_representations

__all__ = ["cell_type_representations", "cellular_annotate", "cellular_embed", "novel_types"]
