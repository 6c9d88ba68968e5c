"""The vectors a quality run has read, kept by sentence, for benchmarks/quality.py and its readers."""

from __future__ import annotations

import sys

import numpy as np

from metaeol_edge.core.embedder import average_layers


class Store:
    """One reader's vectors at several layers, by sentence: a reader sets ``spec`` and ``layers``, calls
    :meth:`start` with its width, and reads new sentences in :meth:`read` (each layer's (n, dim) vectors)."""

    spec: str
    layers: list[int | str]
    note = ""  # said after the count of new sentences (how they are read)

    def start(self, dim: int) -> None:
        self.rows: dict[str, int] = {}
        self.data = [np.empty((0, dim), np.float32) for _ in self.layers]

    def read(self, sentences: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def need(self, sentences: list[str], label: str) -> None:
        todo = [s for s in dict.fromkeys(sentences) if s not in self.rows]
        if not todo:
            return
        print(f"  {self.spec}: {len(todo)} sentences of {label}{self.note}", file=sys.stderr, flush=True)
        per_layer = self.read(todo)
        start = len(self.rows)
        for i, s in enumerate(todo):
            self.rows[s] = start + i
        self.data = [np.concatenate([old, new]) for old, new in zip(self.data, per_layer, strict=True)]

    def get(self, sentences: list[str], option: tuple[int | str, ...]) -> np.ndarray:
        """Vectors at one layer, or several layers' vectors averaged, each layer scaled to unit mean norm; side
        by side where the option starts with :data:`CONCAT`; each vector scaled to unit length before the
        average where it starts with :data:`UNIT`."""
        idx = np.array([self.rows[s] for s in sentences])
        mode = option[0] if option[0] in (CONCAT, UNIT) else None
        parts = [self.data[self.layers.index(layer)][idx] for layer in option[mode is not None :]]
        if len(parts) == 1:
            return parts[0]
        if mode == UNIT:  # a sentence's own vectors only: what the embedder's combine_layers does
            return average_layers(parts)
        # Layers differ in scale (the final one is normed): weigh each equally.
        scaled = [p / np.linalg.norm(p, axis=1).mean() for p in parts]
        return (np.concatenate(scaled, axis=1) if mode == CONCAT else np.mean(scaled, axis=0)).astype(np.float32)


# Markers that lead a layer option, not layers: a resolved layer is -1 (final) or a block from 1.
CONCAT = 0
"""The layers side by side, each scaled to unit mean norm (``(CONCAT, 29, 24)``, named ``cat:29+24``)."""
UNIT = -2
"""The layers averaged, each sentence's vector scaled to unit length first (``unit:29+24``)."""
MODES = {"cat": CONCAT, "unit": UNIT}
