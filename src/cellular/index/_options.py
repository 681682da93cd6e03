"""Settings a reference index accepts and records, shared by building and loading one."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "pynndescent", "exact", "faiss")
METRICS = ("cosine", "euclidean")
# What the distance p-values are calibrated on: held-out cells embedded as a query, or the reference cells themselves.
HELD_OUT_CELLS = "held-out cells read as a query"
REFERENCE_CELLS = "reference cells"
CALIBRATION_SOURCES = (HELD_OUT_CELLS, REFERENCE_CELLS)


def resolve_device(device) -> torch.device:
    """The device of exact search: CUDA when available and ``device`` is ``None``; checked otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available; use device='cpu'.")
    return device
