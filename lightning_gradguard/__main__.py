"""``python -m lightning_gradguard``: the ``gradguard`` command (see :mod:`lightning_gradguard.cli`)."""

import sys

from .cli import main

sys.exit(main())
