"""Retrieval-augmented generation over the prefix cache (the public home of the RAG API).

The pipeline lives in ``prefixcache.apps.rag``; this module keeps the documented
import path ``from prefixcache.rag import RagPipeline``.
"""

from prefixcache.apps.rag import Document, RagAnswer, RagPipeline

__all__ = ["Document", "RagAnswer", "RagPipeline"]
