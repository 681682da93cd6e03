"""JSON encoding of model metadata (scvi registries hold numpy arrays) without pickle."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

_ARRAY_TAG = "__ndarray__"


def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufUSO":
            raise TypeError(f"cannot store an array of dtype {value.dtype} in model metadata")
        kind = "str" if value.dtype.kind in "USO" else value.dtype.str
        items = value.astype(str).tolist() if kind == "str" else value.tolist()
        return {_ARRAY_TAG: items, "dtype": kind, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in model metadata")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if _ARRAY_TAG in value:
            dtype = object if value["dtype"] == "str" else np.dtype(value["dtype"])
            return np.asarray(value[_ARRAY_TAG], dtype=dtype).reshape(value["shape"])
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def encode(value: Any) -> Any:
    """``value`` as plain JSON types (numpy arrays tagged with their dtype and shape)."""
    return _encode(value)


def decode(value: Any) -> Any:
    """Inverse of :func:`encode`."""
    return _decode(value)


def dumps(value: Any) -> str:
    """Serialise nested dicts/lists of plain values and numpy arrays to JSON."""
    return json.dumps(_encode(value), indent=1)


def loads(text: str) -> Any:
    """Inverse of :func:`dumps`."""
    return _decode(json.loads(text))
