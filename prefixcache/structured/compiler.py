"""Compiling constraints to xgrammar grammars, once per distinct constraint.

Why xgrammar (and not llguidance): it is what vLLM and SGLang run by default, its
wheels carry no Rust toolchain or extra runtime, it works on CPU-only machines and
fills a whole batch's token bitmasks in C++ off the GIL, and it offers jump-forward
decoding (``find_jump_forward_tokens``), which this engine uses to append the tokens
a grammar forces without sampling them. llguidance compiles lazily and is as fast per
mask, but would give us none of that which xgrammar does not also give.

A ``GrammarCache`` belongs to one tokenizer. Fronts compile a request's constraint
while validating it (an error then is a 400 naming the construct, before the engine
sees anything); the engine finds the same compiled grammar by the constraint's key.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

import xgrammar as xgr

from prefixcache.structured.spec import StructuredOutput

DEFAULT_MAX_GRAMMARS = 256
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; users need the rest.
_LOCATION = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*")
_WHAT = {
    "json_schema": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regular expression",
    "choice": "choice list",
    "grammar": "EBNF grammar",
}


# xgrammar (0.2.x) writes a string with minLength/maxLength as ``[^\"\\\r\n]{m, n}``,
# which lets raw control characters in, and strict JSON parsers refuse those. The
# unbounded string rule excludes them; the bounded one is given the same class.
_BOUNDED_STRING_CHARS = r"[^\"\\\r\n]"
_JSON_STRING_CHARS = r"[^\0-\x1f\"\\\r\n]"


def json_schema_grammar(source: str) -> xgr.Grammar:
    """The grammar of JSON text valid against the schema ``source`` (compact: no
    optional whitespace), with strings that strict JSON parsers accept."""
    grammar = xgr.Grammar.from_json_schema(source, any_whitespace=False)
    text = str(grammar)
    if _BOUNDED_STRING_CHARS not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHARS, _JSON_STRING_CHARS))


class GrammarError(ValueError):
    """A constraint the grammar library cannot compile; the message names the construct."""


class GrammarCache:
    """Compiled grammars for one tokenizer, keyed by ``StructuredOutput.key`` (LRU).

    Safe to call from any thread. ``hits``/``misses`` count lookups.
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: frozenset[int] | list[int],
        max_grammars: int = DEFAULT_MAX_GRAMMARS,
    ) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._grammars: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._max = max_grammars
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def vocab_size(self) -> int:
        """Width of the logits the bitmasks cover."""
        return self.info.vocab_size

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec``; ``GrammarError`` when it cannot compile."""
        key = spec.key
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                self.hits += 1
                return grammar
        grammar = self._compile(spec)  # outside the lock: other requests go on meanwhile
        with self._lock:
            self.misses += 1
            self._grammars[key] = grammar
            while len(self._grammars) > self._max:
                self._grammars.popitem(last=False)
        return grammar

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        compiler = self._compiler
        try:
            if spec.kind == "json_schema":
                return compiler.compile_grammar(json_schema_grammar(spec.source))
            if spec.kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if spec.kind == "regex":
                return compiler.compile_regex(spec.source)
            if spec.kind == "choice":
                return compiler.compile_regex("|".join(map(re.escape, spec.choices)))
            return compiler.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _LOCATION.sub("", str(exc)).strip().splitlines()[0] if str(exc) else ""
            raise GrammarError(
                f"cannot compile the {_WHAT[spec.kind]}: {reason or type(exc).__name__}"
            ) from None
