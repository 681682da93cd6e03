from ._embed import cellular_embed

__all__ = ["cellular_embed"]
