"""Choice of the torch device from scvi-tools style ``accelerator`` / ``devices`` arguments."""

from __future__ import annotations

import torch


def resolve_device(accelerator: str = "auto", devices: int | str | list[int] = "auto") -> torch.device:
    """Return the single device to train or infer on.

    Parameters
    ----------
    accelerator
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"gpu"``/``"cuda"`` or ``"mps"``.
    devices
        ``"auto"``, a device index, a one-element list of indices, or ``1`` for the first device.
    """
    accelerator = accelerator.lower()
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator not in ("cuda", "mps"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu', 'cuda' or 'mps', got {accelerator!r}.")
    available = torch.cuda.is_available() if accelerator == "cuda" else torch.backends.mps.is_available()
    if not available:
        raise ValueError(f"accelerator={accelerator!r} was requested but is not available; use accelerator='cpu'.")
    if accelerator == "mps":
        return torch.device("mps")
    if devices in ("auto", 1, -1):
        index = torch.cuda.current_device()
    elif isinstance(devices, list | tuple):
        if len(devices) != 1:
            raise ValueError(f"CELLULAR trains on one device; got devices={devices}. Pass a single device index.")
        index = int(devices[0])
    elif isinstance(devices, str) and devices.startswith("cuda"):
        return torch.device(devices)
    else:
        raise ValueError(f"CELLULAR trains on one device; got devices={devices!r}. Pass 'auto' or [index].")
    return torch.device("cuda", index)
