"""The official recipe, computed the plain way: one ``Llama.embed`` call per filled-in
template with LAST pooling, then the mean. Slow (llama.cpp computes an output for
every token and clears its cache each call); it is the yardstick the engine is
checked and timed against, not a code path users need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .engine import init_backend, safe_model_params
from .prompts import TemplateSet, preprocess


class NaiveRecipe:
    def __init__(
        self, model_path: str | Path, n_ctx: int = 1024, n_threads: int | None = None, kv_f32: bool = True
    ) -> None:
        """``kv_f32`` matches the engine's KV precision; False keeps llama.cpp's F16 default."""
        import llama_cpp

        init_backend(verbose=False)
        with safe_model_params():
            self.llm = llama_cpp.Llama(
                str(model_path),
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                type_k=llama_cpp.GGML_TYPE_F32 if kv_f32 else None,
                type_v=llama_cpp.GGML_TYPE_F32 if kv_f32 else None,
                verbose=False,
            )

    def encode(self, sentences: Sequence[str], templates: TemplateSet, per_template: bool = False) -> np.ndarray:
        out = np.empty((len(sentences), len(templates), self.llm.n_embd()), dtype=np.float32)
        for i, s in enumerate(sentences):
            text = preprocess(s.strip())
            for j, t in enumerate(templates.templates):
                out[i, j] = self.llm.embed(t.render(text))
        return out if per_template else out.mean(axis=1, dtype=np.float32)

    def close(self) -> None:
        self.llm.close()
