"""``MetaEOLEmbedding``: a LlamaIndex ``BaseEmbedding`` over an in-process model (extra ``[llama-index]``).

from metaeol_edge.integrations.llama_index import MetaEOLEmbedding
embed_model = MetaEOLEmbedding(model="smollm2-135m")
"""

from __future__ import annotations

from typing import Any

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import PrivateAttr
except ImportError as exc:  # pragma: no cover - the extra is the fix
    raise ImportError("MetaEOLEmbedding needs llama-index-core: pip install 'metaeol-edge[llama-index]'") from exc

from metaeol_edge.core.config import EmbedConfig
from metaeol_edge.core.embedder import MetaEOL


class MetaEOLEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from a GGUF model with MetaEOL.

    ``model``: an id, a path, a ``MetaEOL`` or an ``EmbedConfig``.
    """

    _model: MetaEOL = PrivateAttr()

    def __init__(
        self, model: str | MetaEOL | EmbedConfig | None = None, embed_batch_size: int = 32, **options: Any
    ) -> None:
        made = _embedder(model, options)
        super().__init__(model_name=made.model_label, embed_batch_size=embed_batch_size)
        self._model = made

    @classmethod
    def class_name(cls) -> str:
        return "MetaEOLEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._model.encode([query], show_progress_bar=False)[0].tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._model.encode([text], show_progress_bar=False)[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._model.encode(texts, batch_size=self.embed_batch_size, show_progress_bar=False).tolist()


def _embedder(model: str | MetaEOL | EmbedConfig | None, options: dict[str, Any]) -> MetaEOL:
    """The model given, or the one its configuration (or ``MetaEOL``'s keywords) describes."""
    if isinstance(model, MetaEOL):
        return model
    config = model if isinstance(model, EmbedConfig) else EmbedConfig.of(model=model, **options)
    return MetaEOL.from_config(config.replace(**options) if isinstance(model, EmbedConfig) and options else config)
