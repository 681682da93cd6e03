from ._module import CellularModule

__all__ = ["CellularModule"]
