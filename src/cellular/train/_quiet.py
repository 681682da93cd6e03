"""Keep Lightning's start-up chatter out of a notebook: CELLULAR reports what it ran in ``training_summary_``."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
_WARNINGS = (
    r"The number of training batches .* is smaller than the logging interval",
    r".*LeafSpec.* is deprecated",
    r"early_stopping was automatically disabled due to the use of DDP",
    r"It is recommended to use .*sync_dist=True.*",
)


@contextlib.contextmanager
def quiet_lightning(*, quiet_stdout: bool = True) -> Iterator[None]:
    """Lower Lightning's loggers to warnings and drop its known-harmless warnings for the duration.

    Parameters
    ----------
    quiet_stdout
        Also swallow what is printed to stdout (scvi-tools' early stopping prints its reason there).
    """
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            if quiet_stdout:
                with contextlib.redirect_stdout(io.StringIO()):
                    yield
            else:
                yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
