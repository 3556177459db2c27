"""Structured outputs: constraints, their compiled grammars, per-request matchers and
the batch bitmasks the sampler applies (on xgrammar; ``compiler`` says why)."""

from prefixcache.structured.bitmask import MaskFiller, PendingMask, TokenBitmask
from prefixcache.structured.compiler import GrammarCache, GrammarError
from prefixcache.structured.matcher import GrammarRejected, RequestGrammar
from prefixcache.structured.spec import StructuredOutput

__all__ = [
    "GrammarCache",
    "GrammarError",
    "GrammarRejected",
    "MaskFiller",
    "PendingMask",
    "RequestGrammar",
    "StructuredOutput",
    "TokenBitmask",
]
