"""The faces of metaeol-edge: what users call it through (the shell, HTTP, search over their files)."""
