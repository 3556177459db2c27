"""What a request's output must look like: one frozen, hashable value.

A ``StructuredOutput`` names a kind of constraint and its source text (a JSON schema
as canonical JSON, a regular expression, a list of choices, an EBNF grammar). It
carries no compiled state, so it travels inside ``SamplingParams`` across threads and
processes; the compiled grammar is looked up by ``key`` in a ``GrammarCache``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the generated text.

    ``kind`` is one of ``KINDS``; ``source`` is its text: canonical JSON of the schema
    (``json_schema``), the pattern (``regex``), a JSON list of strings (``choice``),
    an EBNF grammar (``grammar``), or empty (``json_object``: any JSON object). Build
    one with the class methods, which canonicalize, so that equal constraints share
    one compiled grammar.
    """

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.source, str):
            raise ValueError("structured output source must be a string")
        if self.kind != "json_object" and not self.source:
            raise ValueError(f"a {self.kind} constraint needs a non-empty source")

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> StructuredOutput:
        """Output that validates against ``schema`` (a dict, or JSON text of one)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("a JSON schema must be an object (or true/false)")
        return cls("json_schema", _canonical(schema))

    @classmethod
    def json_object(cls) -> StructuredOutput:
        """Output that is any JSON object."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        """Output that matches ``pattern`` in full."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> StructuredOutput:
        """Output that is exactly one of ``choices``."""
        if isinstance(choices, str) or not choices:
            raise ValueError("choices must be a non-empty list of strings")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError("every choice must be a non-empty string")
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def grammar(cls, ebnf: str) -> StructuredOutput:
        """Output in the language of an EBNF (GBNF-style) grammar whose start is ``root``."""
        return cls("grammar", ebnf)

    @property
    def key(self) -> str:
        """A digest naming this constraint: the compiled-grammar cache's key."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()

    @property
    def choices(self) -> list[str]:
        """The choices of a ``choice`` constraint."""
        return json.loads(self.source) if self.kind == "choice" else []


def _canonical(value) -> str:
    """Spacing removed from the text. Key order stays: a grammar writes an object's
    properties in the order its schema lists them."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
