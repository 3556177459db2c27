"""RAG quickstart: pre-warm a few documents, then ask questions that reuse them.

Runs offline on the embedded default model (a tiny model with random weights, so the
answers are gibberish; the point is the cache). Each line shows how many prompt tokens
came from the prefix cache: from the second query on, the system prompt and the first
retrieved document are served from the cache instead of being computed again.

    python examples/rag_quickstart.py [--model PATH_OR_ID] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse

from prefixcache import Engine, SamplingParams
from prefixcache.apps.rag import Document, RagPipeline
from prefixcache.testing import default_model_path

DOCUMENTS = [
    Document(
        "paging",
        "Paged attention stores the key and value cache in fixed-size blocks, so memory "
        "is allocated as a sequence grows instead of reserved up front for the longest one.",
    ),
    Document(
        "radix",
        "A radix tree indexes cached prefixes by their tokens. A new request walks the tree "
        "and reuses every block whose tokens match, computing only the rest of its prompt.",
    ),
    Document(
        "eviction",
        "When blocks run out, the least recently used leaves of the tree are evicted first, "
        "so a shared prefix always outlives the suffixes that hang below it.",
    ),
    Document(
        "pinning",
        "Pinning holds a prefix in the cache against eviction until it is unpinned or its "
        "time to live runs out; the total pinned tokens are capped.",
    ),
]
QUESTIONS = [
    "How does the radix tree reuse cached prefixes?",
    "What is evicted first when blocks run out?",
    "Why does pinning keep a prefix in the cache?",
    "How does paged attention allocate memory?",
]


def main(argv: list[str] | None = None) -> None:
    """Build a pipeline, add the documents pinned, and print cached tokens per query."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or hub id (default: the embedded one)")
    parser.add_argument("--url", help="a running `prefixcache serve` instead of a local engine")
    parser.add_argument("--api-key", help="API key for --url")
    args = parser.parse_args(argv)
    if args.url:
        target = args.url
    else:
        model = args.model or str(default_model_path())
        target = Engine.from_pretrained(model, kv_cache_tokens=8192, max_model_len=4096)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    with RagPipeline(target, api_key=args.api_key) as rag:
        for handle, doc in zip(rag.add_documents(DOCUMENTS, pin=True), DOCUMENTS, strict=True):
            print(f"pre-warmed {doc.id:<9} {handle.num_cached_tokens:>4} tokens cached")
        for i, question in enumerate(QUESTIONS, 1):
            answer = rag.query(question, top_k=2, params=params)
            print(
                f"query {i}: documents {answer.documents}, "
                f"cached tokens {answer.num_cached_tokens}, answer {answer.text!r}"
            )


if __name__ == "__main__":
    main()
