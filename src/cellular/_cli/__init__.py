"""The ``cellular`` command line: train a model on a reference h5ad, then embed, annotate, flag or map query h5ads.

Every subcommand reads h5ad files and writes new ones (the input is never modified), so the results are the same as
those of the Python functions of :mod:`cellular.tl` on the same data. Exit codes: 0 on success, 2 for bad arguments
(argparse's convention: unknown options, a missing input file or model folder, an output that exists without
``--overwrite``, out-of-range numbers) and 1 for data or a model the library rejects; the message names the problem
and ``--debug`` adds the traceback.
"""

from ._common import EXIT_DATA_ERROR, EXIT_OK, EXIT_USAGE_ERROR
from ._main import main
from ._parser import build_parser

__all__ = ["EXIT_DATA_ERROR", "EXIT_OK", "EXIT_USAGE_ERROR", "build_parser", "main"]
