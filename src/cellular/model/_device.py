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
        ``"auto"``, a device index, a list of indices, or a number of devices. Inference and the classifier head run
        in one process: with several devices, on this process's own device (its rank's under distributed training,
        else the first listed).
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
    if isinstance(devices, str) and devices.startswith("cuda"):
        return torch.device(devices)
    if isinstance(devices, list | tuple) and devices and not _distributed():
        return torch.device("cuda", int(devices[0]))
    if devices == "auto" or isinstance(devices, int | list | tuple):
        return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"devices must be 'auto', a number of devices or a list of indices; got devices={devices!r}.")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
