"""``python -m lightning_utils.cli``: the same as the ``lightning-utils`` console script."""

import sys

from lightning_utils.cli import main

sys.exit(main())
