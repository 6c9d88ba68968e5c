"""``python -m metaeol_edge`` runs the ``metaeol`` command."""

import sys

from metaeol_edge.faces.cli import main

sys.exit(main())
