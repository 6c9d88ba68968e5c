"""``python -m metaeol_edge`` runs the ``metaeol`` command."""

import sys

from .cli import main

sys.exit(main())
