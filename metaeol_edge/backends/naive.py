"""The official recipe, computed the plain way: one ``Llama.embed`` call per filled-in
template with LAST pooling, then the mean. Slow (llama.cpp computes an output for
every token and clears its cache each call); it is the yardstick the engine is
checked and timed against, not a code path users need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaeol_edge.backends import Backend, Progress
from metaeol_edge.llamacpp import init_backend, safe_model_params
from metaeol_edge.methods import Prompt
from metaeol_edge.methods.layers import FINAL, Read
from metaeol_edge.models.modelfile import inspect_gguf


class NaiveBackend(Backend):
    """``Llama.embed`` with LAST pooling: the final-norm state of the last token, nothing else."""

    name = "naive"
    cache_tag = "naive"

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
        self.n_layer = inspect_gguf(model_path).n_layer
        self.dim = self.llm.n_embd()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", "ignore")

    def states(self, prompts: Sequence[Prompt], layers: Sequence[Read], progress: Progress | None = None) -> np.ndarray:
        if list(layers) != [FINAL]:
            raise ValueError("the naive recipe reads the final layer only")
        out = np.empty((1, len(prompts), self.dim), dtype=np.float32)
        for k, p in enumerate(prompts):
            if p.pool is not None:
                raise ValueError("the naive recipe reads the last token only")
            if p.rewrite is not None:
                raise ValueError(
                    "the naive recipe (Llama.embed) cannot rewrite hidden states: token prepending needs "
                    "the llama.cpp engine or the pytorch backend"
                )
            out[0, k] = self.llm.embed(p.text)
            if progress:
                progress(1)
        return out

    def close(self) -> None:
        self.llm.close()
