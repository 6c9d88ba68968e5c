"""The page for people that ``metaeol serve`` answers at ``/``: search, compare, map and status.

Plain files shipped in the package (``static/``): no build step, no framework, no remote origin.
The page is one more client of the server's API; :func:`mount` adds its files and ``GET /v1/status``.
"""

from metaeol_edge.faces.web.page import CSP, PAGE_HEADERS, mount, status

__all__ = ["CSP", "PAGE_HEADERS", "mount", "status"]
