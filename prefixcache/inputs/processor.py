"""From a user's prompt to validated token ids: the one place input is checked.

Text goes through the tokenizer, message lists through the chat template via the
segment cache (unchanged messages are never tokenized again), token ids are checked
against the vocabulary, and lengths against ``EngineLimits``. Tokenizing stops as
soon as a prompt passes the context limit (``PromptTooLong``), so a giant text costs
about the limit's work. Every method is safe to call from any thread: none touches
the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from chunking.bounded import PromptTooLong, encode_bounded
from chunking.segments import SegmentTokenizer
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.tokenizer import checked_tokens, validate_messages
from prefixcache.structured import GrammarCache, StructuredOutput
from prefixcache.tools import ToolCallParser, parser_for_template

Prompt = str | Sequence[int] | np.ndarray  # text, token ids, or an int array of them


class InputProcessor:
    """Tokenizes and validates prompts for one engine, on its tokenizer and limits."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        limits: EngineLimits,
        grammars: GrammarCache | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.segments = SegmentTokenizer(tokenizer)
        self.grammars = grammars
        # The tool-call format the chat template writes (None: it writes none).
        self.tool_parser: type[ToolCallParser] | None = parser_for_template(tokenizer.chat_template)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt that leaves room for one output token."""
        return self.limits.max_context_tokens - 1

    def prompt_tokens(self, prompt: Prompt) -> np.ndarray:
        """Validated token ids of a text or token-id prompt, as an int32 array.

        An int32 array is not copied. ValueError on an empty or out-of-vocabulary prompt;
        ``PromptTooLong`` (a ValueError) once a text passes ``max_prompt_tokens``.
        """
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            with self._limited():
                prompt = encode_bounded(
                    self.tokenizer, prompt, self.max_prompt_tokens, add_special_tokens=True
                )
        elif not isinstance(prompt, np.ndarray):
            prompt = list(prompt)
        return checked_tokens(prompt, self.limits.vocab_size)

    def chat_tokens(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> np.ndarray:
        """Token ids of an OpenAI-style message list through the chat template.

        With ``add_generation_prompt=False`` the assistant header is left out, so the
        ids are a prefix of any later conversation that extends ``messages``. ``tools``
        are OpenAI function definitions, rendered where the template puts them (one
        segment: a later turn with the same tools neither renders nor tokenizes them).
        """
        validate_messages(messages)
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate()")
        with self._limited():
            return self.segments.encode_chat(
                messages, add_generation_prompt, max_tokens=self.max_prompt_tokens, tools=tools
            )

    def prewarm_tokens(self, prompt: Prompt | Sequence[dict]) -> np.ndarray:
        """What pre-warming caches: a message list without the generation prompt, or a
        text or token-id prompt as it is."""
        if _is_messages(prompt):
            return self.chat_tokens(prompt, add_generation_prompt=False)
        return self.prompt_tokens(prompt)

    def check_structured(self, spec: StructuredOutput) -> None:
        """Compile ``spec`` (cached for the engine, which compiles it again on add);
        ``GrammarError`` (a ValueError) naming what cannot compile."""
        if self.grammars is None:
            raise ValueError("this engine has no structured output support")
        self.grammars.compile(spec)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError unless the prompt plus ``max_tokens`` fits (see ``EngineLimits``)."""
        self.limits.check_fits(num_prompt_tokens, max_tokens)

    @contextlib.contextmanager
    def _limited(self) -> Iterator[None]:
        """Name the context limit in a ``PromptTooLong`` raised inside."""
        try:
            yield
        except PromptTooLong as exc:
            raise PromptTooLong(exc.counted, exc.limit, _context(self.limits)) from None


def _context(limits: EngineLimits) -> str:
    """The limit a prompt runs into, as a message names it."""
    if limits.max_context_tokens == limits.max_model_len:
        return f"max_model_len ({limits.max_model_len})"
    return f"the KV cache ({limits.max_context_tokens} tokens)"


def _is_messages(prompt) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and bool(prompt)
        and isinstance(prompt[0], dict)
    )
