"""Retrievers for ``RagPipeline``: any callable ``(question, documents, k) -> ids``.

The default ranks with BM25 from the ``bm25s`` library; its index is rebuilt only
when the set of documents changes, not on every query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefixcache.apps.rag import Document

Retriever = Callable[[str, Sequence["Document"], int], list[str]]


class BM25Retriever:
    """Ranks documents against a question with Okapi BM25 (``bm25s``), English stopwords."""

    def __init__(self, stopwords: str | list[str] | None = "en") -> None:
        self.stopwords = stopwords
        self._key: tuple[tuple[str, str], ...] | None = None
        self._index = None

    def __call__(self, question: str, documents: Sequence[Document], k: int) -> list[str]:
        """Ids of the ``k`` best-scoring documents, best first (fewer if there are fewer)."""
        k = min(k, len(documents))
        if k <= 0:
            return []
        index = self._index_for(documents)
        query = self._tokenize([question])
        if not query[0]:  # nothing searchable in the question: no ranking to speak of
            return [d.id for d in documents[:k]]
        found, _ = index.retrieve(query, k=k, show_progress=False)
        return [documents[int(i)].id for i in found[0]]

    def _index_for(self, documents: Sequence[Document]):
        import bm25s

        key = tuple((d.id, d.text) for d in documents)
        if key != self._key:
            self._index = bm25s.BM25()
            self._index.index(self._tokenize([d.text for d in documents]), show_progress=False)
            self._key = key
        return self._index

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(
            texts, stopwords=self.stopwords, return_ids=False, show_progress=False
        )
