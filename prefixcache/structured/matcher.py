"""One request's grammar state, advanced only by the tokens the request keeps.

The matcher moves forward exactly once per token appended to the sequence (sampled
or jumped forward), never on a forward pass. A preempted request keeps its matcher:
its recompute runs the same tokens through the model again but appends none, so the
state resumes where it was and no token is ever accepted twice. A request sharing a
cached prefix with another shares KV blocks, never a matcher.
"""

from __future__ import annotations

import torch
import xgrammar as xgr


class GrammarRejected(RuntimeError):
    """A token the grammar does not allow reached the matcher (a masking bug)."""


class RequestGrammar:
    """An xgrammar matcher for one request, with jump-forward when asked for."""

    __slots__ = ("matcher", "jump_forward", "_stop_ids", "_terminated")

    def __init__(self, compiled: xgr.CompiledGrammar, jump_forward: bool = False) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.jump_forward = jump_forward
        self._stop_ids = frozenset(compiled.tokenizer_info.stop_token_ids)
        self._terminated = False

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id``; ``GrammarRejected`` if the grammar forbids it."""
        if not self.matcher.accept_token(token_id):
            raise GrammarRejected(f"token {token_id} is not allowed by the request's grammar")
        # Only an accepted stop token ends a grammar, so the matcher is asked only then.
        if token_id in self._stop_ids:
            self._terminated = self.matcher.is_terminated()

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and its stop token accepted."""
        return self._terminated

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]``; False when every token
        is allowed (the row then needs no masking)."""
        return self.matcher.fill_next_token_bitmask(bitmask, row)

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar forces next, already accepted (none unless
        jump-forward is on). The caller appends them to the sequence."""
        if not self.jump_forward or limit <= 0:
            return []
        tokens = self.matcher.find_jump_forward_tokens()[:limit]
        for token in tokens:
            self.accept(token)
        return tokens
