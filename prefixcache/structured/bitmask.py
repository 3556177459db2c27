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

import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import xgrammar as xgr

from prefixcache.structured.matcher import RequestGrammar

_LITTLE_ENDIAN = sys.byteorder == "little"


class TokenBitmask(NamedTuple):
    """Allowed tokens of the constrained rows of a batch: one bit per token."""

    bits: torch.Tensor  # int32 [rows in the batch, ceil(vocab / 32)]
    rows: list[int]  # the constrained rows; the others are left as they are
    vocab_size: int

    def apply(self, logits: torch.Tensor) -> None:
        """Set every forbidden token's logit to -inf, in place (one call for the batch)."""
        if not self.rows:
            return
        # numpy has no bfloat16; the sampler masks float32 logits.
        if logits.device.type == "cpu" and logits.dtype != torch.bfloat16 and _LITTLE_ENDIAN:
            _apply_on_cpu(logits, self.bits, self.rows, self.vocab_size)
            return
        bits = self.bits if self.bits.device == logits.device else self.bits.to(logits.device)
        # With every row masked, no index list: the kernel walks the batch as it lies.
        rows = None if len(self.rows) == logits.shape[0] else self.rows
        xgr.apply_token_bitmask_inplace(logits, bits, vocab_size=self.vocab_size, indices=rows)


def _apply_on_cpu(logits: torch.Tensor, bits: torch.Tensor, rows: list[int], vocab: int) -> None:
    """The same masking as xgrammar's CPU kernel, several times faster: that kernel
    tests one bit per token (2 ms for 16 rows of a 32k vocabulary), while numpy
    unpacks the words to one flag per token in bulk and sets the flagged logits in one
    pass. Bit ``j`` of word ``w`` is token ``32 * w + j``: on a little-endian machine,
    bit ``j % 8`` of byte ``4 * w + j // 8``, the order in which
    ``unpackbits(bitorder="little")`` reads the words' bytes."""
    every_row = len(rows) == logits.shape[0]
    words = bits.numpy() if every_row else bits.numpy()[rows]
    forbidden = np.unpackbits(np.invert(words).view(np.uint8), -1, vocab, bitorder="little")
    values = logits.detach().numpy()  # shares the tensor's memory
    if every_row:
        values[:, :vocab][forbidden.view(np.bool_)] = -np.inf
    else:
        masked = values[rows, :vocab]  # a copy: written back below
        masked[forbidden.view(np.bool_)] = -np.inf
        values[rows, :vocab] = masked


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
        self._bits = xgr.allocate_token_bitmask(0, vocab_size)  # grown to the largest batch
        # In line (CPU) the fill shares the cores with the forward: one thread is enough.
        self._batch = xgr.BatchGrammarMatcher("auto" if overlap else 1)

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
        """Fill the masks of ``rows`` now, on this thread.

        The bitmask is a view of one buffer that every fill reuses: it is valid until
        the next fill, which the engine starts only after the step that used it. xgrammar
        writes the whole of each filled row, so stale rows need no reset; the rows of
        free requests are never read.
        """
        bits = self._batch_bits(len(grammars))
        matchers = [grammars[row].matcher for row in rows]
        self._batch.batch_fill_next_token_bitmask(matchers, bits, rows)  # one call, in C++
        return TokenBitmask(bits, rows, self.vocab_size)

    def _batch_bits(self, batch: int) -> torch.Tensor:
        if batch > self._bits.shape[0]:
            self._bits = xgr.allocate_token_bitmask(
                max(batch, 2 * self._bits.shape[0]), self.vocab_size
            )
        return self._bits[:batch]

    def close(self) -> None:
        """Stop the worker thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
