"""Search by meaning over your own files, offline (issue 31).

A *collection* is one SQLite file of chunks (text, source, span, content hash,
vector) made with one configuration of this runtime. Modules, by concern:
:mod:`.chunking` (text into chunks that fit ``max_length``), :mod:`.sources`
(folders and tables into text), :mod:`.store` (the SQLite file and its
migrations), :mod:`.config` (what a collection's vectors depend on),
:mod:`.rank` (exact top-k and the approximate index), :mod:`.collection`
(:class:`Collection`, what the shell, Python and HTTP call) and :mod:`.http`
(the server's routes).
"""

from metaeol_edge.faces.search.collection import Collection, Hit, IndexReport, list_collections, remove_collection

__all__ = ["Collection", "Hit", "IndexReport", "list_collections", "remove_collection"]
