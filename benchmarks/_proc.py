"""What the benchmarks measure about their own process."""

from __future__ import annotations

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork
# and exec (see the function's docstring). One implementation, the package's.
from metaeol_edge.bulk import peak_rss_mb

__all__ = ["peak_rss_mb"]
