"""Write the golden vectors the restructure must reproduce bit for bit (tests/test_golden.py).

Run once, on the code *before* a change that must not move any vector:

    python tests/golden/make_golden.py tests/golden/vectors.npz                 # the shipped files
    python tests/golden/make_golden.py tests/golden/vectors_f16.npz f16         # a derived level, made once

A derived level is written for the models whose default (``level="auto"``) it is
(:mod:`metaeol_edge.quantization`): smollm2-135m's Q4_1 runs at F16.

Each model's vectors, for MetaEOL and PromptEOL, at layers 1, n_layer // 2 and -1
(each layer its own model object, so the lower two run with early exit, as a
user's default does), with the embedding cache off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from metaeol_edge import MetaEOL, registry

SENTENCES = json.loads((Path(__file__).parent / "sentences.json").read_text(encoding="utf-8"))
MODELS = ("smollm2-135m", "gemma3-270m")
METHODS = ("metaeol", "prompteol")


def golden_key(model: str, method: str, layer: int) -> str:
    return f"{model}|{method}|{layer}"


def layers_of(model: str) -> list[int]:
    n = registry.get_spec(model).n_layer
    return [1, n // 2, -1]


DERIVED_MODELS = ("smollm2-135m",)


def main(out: str, level: str = "shipped") -> None:
    arrays = {}
    for model in MODELS if level == "shipped" else DERIVED_MODELS:
        path = registry.resolve_model(model)
        for method in METHODS:
            for layer in layers_of(model):
                with MetaEOL(path, templates=method, layer=layer, cache=False, level=level) as m:
                    arrays[golden_key(model, method, layer)] = m.encode(SENTENCES, show_progress_bar=False)
                print(model, method, layer, file=sys.stderr)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:3])
