"""Contrastive Prompting as its authors run it, for benchmarks/quality.py (issue 33, lever 2).

Cheng et al., "Contrastive Prompting Enhances Sentence Embeddings in LLMs through Inference-Time
Steering" (arXiv 2505.12831; repo zifengcheng/CP, ``evaluate_intervention.py`` with
``--intervention_plan scaled --intervention_location att_head``):

1. the auxiliary prompt (``prompts/cp-aux.json``) runs up to block ``act`` (0-based), and the input of
   that block's attention output projection (the heads' contextualized values) is kept at its last token;
2. the main prompt runs whole, and at the same place its last token's values ``A`` are replaced by
   ``coeff * (A - B)``, ``B`` the auxiliary prompt's;
3. the layers asked for are read at the last token, as the engine reads them.

The subtraction happens inside the forward pass, where llama.cpp's graph offers no hook this project
uses yet, so this runs in PyTorch (the GGUF file dequantized to float32: :class:`TorchBackend`, whose
vectors the tests hold to the engine's). It is a measurement, not a product path: a lever becomes a
method when dev says it is worth one.
"""

from __future__ import annotations

import numpy as np
from _vectors import Store
from metaeol_edge.prompts import load_templates, preprocess

from metaeol_edge.backends.torch import TorchBackend
from metaeol_edge.methods.layers import resolve_layers
from metaeol_edge.models.resolve import resolve_model

AUX = "cp-aux"


class _Stop(Exception):
    """Raised by the capture hook: nothing above the steered block is needed from the auxiliary pass."""


class SteeredVectors(Store):
    """A reader (:class:`_vectors.Store`) for a spec ``TEMPLATES+cp:ACT:COEFF`` (``ke&pretcot+cp:4:0.5``), or
    ``TEMPLATES+pt``: the same PyTorch passes with no steering, the baseline each steered row is measured
    against (the engine's vectors differ from these by the dequantization's rounding)."""

    def __init__(self, model: str, spec: str, layers: list[int], batch_size: int, threads: int | None) -> None:
        names, _, method = spec.partition("+")
        kind, _, rest = method.partition(":")
        if kind == "pt" and not rest:
            self.act, self.coeff = None, None
        elif kind == "cp" and rest.count(":") == 1:
            act, coeff = rest.split(":")
            self.act, self.coeff = int(act), float(coeff)
        else:
            raise SystemExit(f"unknown method in {spec!r}: +cp:ACT:COEFF or +pt")
        self.spec = spec
        self.templates = [t for n in names.split("&") for t in load_templates(n).templates]
        self.aux = load_templates(AUX).templates[0]
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.backend = TorchBackend(resolve_model(model), dtype="float32")
        n_layer = self.backend.n_layer
        if self.act is not None and not 0 <= self.act < n_layer:
            raise SystemExit(f"{spec}: the steered block must be 0..{n_layer - 1}")
        self.layers = list(resolve_layers(list(layers), n_layer)[0])  # checked, as the embedder's reads are
        self.batch_size = batch_size
        self.note = " (PyTorch)" if self.act is None else " (PyTorch, steered)"
        self.start(self.backend.dim)

    # -- the two passes ------------------------------------------------------------------------

    def _batch(self, texts: list[str]):
        torch = self.backend.torch
        enc = self.backend.tokenizer(texts, padding=True, return_tensors="pt")
        mask = enc["attention_mask"]
        # Left padding: each prompt's positions start at 0 where its own tokens start, as in the engine.
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return enc["input_ids"], mask, positions, torch

    def _values_of_aux(self, texts: list[str]):
        ids, mask, positions, torch = self._batch(texts)
        got = []

        def capture(module, args):
            got.append(args[0][:, -1, :].clone())
            raise _Stop

        o_proj = self.backend.model.layers[self.act].self_attn.o_proj
        handle = o_proj.register_forward_pre_hook(capture)
        try:
            with torch.no_grad():
                self.backend.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        except _Stop:
            pass
        finally:
            handle.remove()
        return got[0]

    def _steered(self, texts: list[str], aux_values) -> list[np.ndarray]:
        ids, mask, positions, torch = self._batch(texts)
        coeff = self.coeff

        def steer(module, args):
            x = args[0].clone()
            x[:, -1, :] = coeff * (x[:, -1, :] - aux_values)
            return (x, *args[1:])

        captured: dict = {}
        handles = self.backend._hooks(self.layers, captured)
        if self.act is not None:
            handles.append(self.backend.model.layers[self.act].self_attn.o_proj.register_forward_pre_hook(steer))
        try:
            with torch.no_grad():
                out = self.backend.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
                )
        finally:
            for h in handles:
                h.remove()
        return [
            self.backend._layer_state(out.hidden_states, captured, layer)[:, -1, :].float().numpy()
            for layer in self.layers
        ]

    def read(self, sentences: list[str]) -> list[np.ndarray]:
        """Each layer's (n, dim) vectors: the mean over the templates of each steered prompt's read."""
        clean = [preprocess(s.strip()) for s in sentences]
        n_t = len(self.templates)
        per_layer = [np.zeros((len(sentences), self.backend.dim), np.float32) for _ in self.layers]
        for i in range(0, len(clean), self.batch_size):
            chunk = clean[i : i + self.batch_size]
            # One auxiliary pass serves every template of the set (the authors' CK does the same).
            aux = None if self.act is None else self._values_of_aux([self.aux.render(s) for s in chunk])
            for t in self.templates:
                reads = self._steered([t.render(s) for s in chunk], aux)
                for li, r in enumerate(reads):
                    per_layer[li][i : i + len(chunk)] += r / n_t
        return per_layer
