"""Token bitmasks for a batch: filled beside the forward pass, applied in the sampler.

Which tokens a grammar allows next depends only on the tokens already accepted, all
known before the step's forward pass starts. So with ``overlap`` the masks of the rows
that sample this step are filled on a worker thread while the model runs, and the
sampler waits for them only once it has the logits. That pays where the forward
leaves the GIL free for long (a GPU step waiting on its kernels). On CPU the forward
of a small model is Python holding the GIL, and the worker would wait for a GIL
switch (5 ms) to do microseconds of work, so there the masks are filled in line.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
import xgrammar as xgr

from prefixcache.structured.matcher import RequestGrammar


class TokenBitmask(NamedTuple):
    """Allowed tokens of the constrained rows of a batch: one bit per token."""

    bits: torch.Tensor  # int32 [rows in the batch, ceil(vocab / 32)]
    rows: list[int]  # the constrained rows; the others are left as they are
    vocab_size: int

    def apply(self, logits: torch.Tensor) -> None:
        """Set every forbidden token's logit to -inf, in place."""
        bits = self.bits if self.bits.device == logits.device else self.bits.to(logits.device)
        xgr.apply_token_bitmask_inplace(logits, bits, vocab_size=self.vocab_size, indices=self.rows)


class PendingMask(NamedTuple):
    """A bitmask being filled (or filled already); ``result`` waits for it."""

    future: Future | None
    filled: TokenBitmask | None = None

    def result(self) -> TokenBitmask:
        """The filled bitmask (re-raises what the filling raised)."""
        return self.filled if self.future is None else self.future.result()


class MaskFiller:
    """Fills batch bitmasks, on one worker thread with ``overlap`` (one batch at a time)."""

    def __init__(self, vocab_size: int, overlap: bool = False) -> None:
        self.vocab_size = vocab_size
        self.overlap = overlap
        self._pool: ThreadPoolExecutor | None = None

    def start(self, grammars: Sequence[RequestGrammar | None]) -> PendingMask | None:
        """Begin filling the masks of ``grammars`` (one per sampled row; None: free
        row). None when no row is constrained. The matchers must not change until the
        result has been taken."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        if not self.overlap:
            return PendingMask(None, self.fill(grammars, rows))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return PendingMask(self._pool.submit(self.fill, grammars, rows))

    def fill(self, grammars: Sequence[RequestGrammar | None], rows: list[int]) -> TokenBitmask:
        """Fill the masks of ``rows`` now, on this thread."""
        bits = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        for row in rows:
            grammars[row].fill(bits, row)
        return TokenBitmask(bits, rows, self.vocab_size)

    def close(self) -> None:
        """Stop the worker thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
