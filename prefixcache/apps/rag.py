"""Retrieval-augmented generation over the prefix cache.

Prompt layout (the same for pre-warming and for queries, so they share a prefix)::

    system:  system_prompt
    user:    template(document 1)      <- one message per retrieved document,
    user:    template(document 2)         in the order they were added
    user:    question

``add_documents`` pre-warms ``[system, document]`` for each document, which is exactly
how a query's prompt starts when that document comes first. Documents are put in a
canonical order (the order they were added), so the same set of documents always
gives the same prompt prefix whatever order the retriever ranks them in.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prefixcache.apps.rag_backends import HttpBackend, LocalBackend, Piece
from prefixcache.apps.retrievers import BM25Retriever, Retriever
from prefixcache.cache.pins import PinHandle
from prefixcache.sampling_params import SamplingParams

DEFAULT_SYSTEM_PROMPT = (
    "You answer questions using only the documents provided. "
    "If the documents do not contain the answer, say so."
)
DEFAULT_TEMPLATE = "Document [{id}]\n{text}"


@dataclass(frozen=True, slots=True)
class Document:
    """A retrievable text with a unique ``id`` and free-form ``metadata``."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


class RagAnswer(NamedTuple):
    """A query's reply, the prompt tokens served from the cache, and the documents used."""

    text: str
    num_cached_tokens: int
    documents: list[str]


class RagPipeline:
    """Retrieve documents, put them in a cache-friendly prompt, and generate an answer.

    ``engine_or_url`` is an in-process ``Engine`` (driven on the caller's thread) or
    the URL of a running ``prefixcache serve`` (``api_key``, ``model`` and
    ``cache_salt`` then go with every request). ``retriever`` is any callable
    ``(question, documents, k) -> ids``; the default is BM25. ``template`` formats one
    document with the fields ``{id}``, ``{text}`` and any of its metadata keys.
    """

    def __init__(
        self,
        engine_or_url: Any,
        retriever: Retriever | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        template: str = DEFAULT_TEMPLATE,
        api_key: str | None = None,
        model: str | None = None,
        cache_salt: str | None = None,
    ) -> None:
        if not isinstance(system_prompt, str) or not system_prompt:
            raise ValueError("system_prompt must be a non-empty string")
        self.backend = _make_backend(engine_or_url, api_key, model, cache_salt)
        self.retriever = retriever if retriever is not None else BM25Retriever()
        self.system_prompt = system_prompt
        self.template = template
        self._documents: dict[str, Document] = {}  # insertion order is the canonical order
        self._pins: dict[str, str] = {}
        self._ids = itertools.count()

    @property
    def documents(self) -> list[Document]:
        """The stored documents, in canonical (insertion) order."""
        return list(self._documents.values())

    def add_documents(
        self,
        texts_or_documents: Iterable[str | Document],
        pin: bool = False,
        ttl: float | None = None,
    ) -> list[PinHandle]:
        """Store documents and pre-warm each as the first document after the system prompt.

        With ``pin`` each pre-warmed prefix is held against eviction (until
        ``remove_documents`` or ``ttl`` seconds). Bad documents (an id in use, a
        template that does not fit) raise ValueError before anything is stored; an
        engine refusal (the pin cap) raises ValueError and keeps the documents
        added before it. Returns one handle per document.
        """
        documents = self._new_documents(texts_or_documents)
        handles = []
        for doc in documents:
            handle = self.backend.prewarm(self.messages([doc]), pin, ttl)
            self._documents[doc.id] = doc
            if handle.pinned and handle.handle is not None:
                self._pins[doc.id] = handle.handle
            handles.append(handle)
        return handles

    def remove_documents(self, ids: Iterable[str]) -> None:
        """Forget documents and release their pins; ValueError (nothing removed) if unknown."""
        ids = list(dict.fromkeys(ids))
        unknown = [i for i in ids if i not in self._documents]
        if unknown:
            raise ValueError(f"unknown document ids: {unknown}")
        for doc_id in ids:
            del self._documents[doc_id]
            handle = self._pins.pop(doc_id, None)
            if handle is not None:
                self.backend.unpin(handle)

    def query(
        self, question: str, top_k: int = 3, params: SamplingParams | None = None
    ) -> RagAnswer:
        """Answer ``question`` from its ``top_k`` best documents."""
        ids, messages = self.compose(question, top_k)
        text, cached = [], 0
        for piece in self.backend.stream(messages, params or SamplingParams()):
            text.append(piece.text)
            cached = piece.num_cached_tokens if piece.num_cached_tokens is not None else cached
        return RagAnswer("".join(text), cached, ids)

    def stream_query(
        self, question: str, top_k: int = 3, params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Like ``query`` but yields the answer's text as it is generated."""
        _, messages = self.compose(question, top_k)
        pieces: Iterator[Piece] = self.backend.stream(messages, params or SamplingParams())
        for piece in pieces:
            if piece.text:
                yield piece.text

    def compose(self, question: str, top_k: int = 3) -> tuple[list[str], list[dict]]:
        """Retrieve for ``question``; returns (document ids in canonical order, messages)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
        documents = self.documents
        found = set(self.retriever(question, documents, top_k)) if documents and top_k else set()
        unknown = found - self._documents.keys()
        if unknown:
            raise ValueError(f"the retriever returned unknown document ids: {sorted(unknown)}")
        chosen = [d for d in documents if d.id in found][:top_k]
        messages = self.messages(chosen) + [{"role": "user", "content": question}]
        return [d.id for d in chosen], messages

    def messages(self, documents: Sequence[Document]) -> list[dict]:
        """The system prompt and one message per document: every prompt's common start."""
        head = [{"role": "system", "content": self.system_prompt}]
        return head + [{"role": "user", "content": self._render(d)} for d in documents]

    def close(self) -> None:
        """Release the backend's resources (an HTTP connection pool)."""
        self.backend.close()

    def __enter__(self) -> RagPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _render(self, doc: Document) -> str:
        try:
            return self.template.format(**{**doc.metadata, "id": doc.id, "text": doc.text})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"template cannot format document {doc.id!r}: {exc!r}") from None

    def _new_documents(self, items: Iterable[str | Document]) -> list[Document]:
        if isinstance(items, str | Document):
            items = [items]
        documents = [self._as_document(item) for item in items]
        seen = set(self._documents)
        for doc in documents:
            if doc.id in seen:
                raise ValueError(f"document id {doc.id!r} is already in use")
            if not doc.text:
                raise ValueError(f"document {doc.id!r} has no text")
            seen.add(doc.id)
            self._render(doc)
        return documents

    def _as_document(self, item: str | Document) -> Document:
        if isinstance(item, Document):
            return item
        if not isinstance(item, str):
            raise ValueError(f"expected a str or Document, got {type(item).__name__}")
        doc_id = next(f"doc-{n}" for n in self._ids if f"doc-{n}" not in self._documents)
        return Document(doc_id, item)


def _make_backend(engine_or_url: Any, api_key, model, cache_salt):
    if isinstance(engine_or_url, str):
        if not engine_or_url.startswith(("http://", "https://")):
            raise ValueError(f"expected an Engine or an http(s) URL, got {engine_or_url!r}")
        return HttpBackend(engine_or_url, api_key=api_key, model=model, cache_salt=cache_salt)
    if hasattr(engine_or_url, "prewarm") and hasattr(engine_or_url, "step"):
        return LocalBackend(engine_or_url, salt=cache_salt)
    raise ValueError(f"expected an Engine or an http(s) URL, got {type(engine_or_url).__name__}")
