"""``MetaEOLEmbeddings``: a LangChain ``Embeddings`` over an in-process model (extra ``[langchain]``).

from metaeol_edge.integrations.langchain import MetaEOLEmbeddings
embeddings = MetaEOLEmbeddings(model="smollm2-135m", templates="metaeol")
embeddings.embed_documents(["A cat sleeps."]); embeddings.embed_query("a sleeping cat")
"""

from __future__ import annotations

from typing import Any

try:
    from langchain_core.embeddings import Embeddings
except ImportError as exc:  # pragma: no cover - the extra is the fix
    raise ImportError("MetaEOLEmbeddings needs langchain-core: pip install 'metaeol-edge[langchain]'") from exc

from metaeol_edge.core.config import EmbedConfig
from metaeol_edge.core.embedder import MetaEOL


class MetaEOLEmbeddings(Embeddings):
    """LangChain embeddings from a GGUF model with MetaEOL.

    ``model``: an id, a path, a ``MetaEOL`` or an ``EmbedConfig``.
    """

    def __init__(self, model: str | MetaEOL | EmbedConfig | None = None, batch_size: int = 32, **options: Any) -> None:
        self.model = _embedder(model, options)
        self.batch_size = batch_size

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=False).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.model.encode([text], show_progress_bar=False)[0].tolist()


def _embedder(model: str | MetaEOL | EmbedConfig | None, options: dict[str, Any]) -> MetaEOL:
    """The model given, or the one its configuration (or ``MetaEOL``'s keywords) describes."""
    if isinstance(model, MetaEOL):
        return model
    config = model if isinstance(model, EmbedConfig) else EmbedConfig.of(model=model, **options)
    return MetaEOL.from_config(config.replace(**options) if isinstance(model, EmbedConfig) and options else config)
