"""``python -m cellular._cli``: the ``cellular`` command."""

import sys

from . import main

sys.exit(main())
