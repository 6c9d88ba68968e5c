"""In-process adapters for frameworks that take an embedder object: LangChain, LlamaIndex.

Each lives in its own module and extra (``[langchain]``, ``[llama-index]``), so
importing one never needs the other's framework.
"""
