"""``python -m diffusers_lorax`` is the ``lorax`` command."""

import sys

from .cli import main

sys.exit(main())
