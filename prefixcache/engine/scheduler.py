"""Continuous batching: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

import bisect
import time
from collections import deque
from itertools import islice
from typing import NamedTuple

from prefixcache.cache.block_manager import BlockManager
from prefixcache.engine.capacity import KVCapacity
from prefixcache.engine.errors import KVCacheBusyError, KVCacheExhaustedError
from prefixcache.engine.sequence import Sequence, SequenceStatus
from prefixcache.engine.step_cost import StepBudget

# Admission looks this far down the queue for the request with the longest cached prefix.
ADMISSION_WINDOW = 8
# A request passed over this many times is admitted next whatever its cache hit.
MAX_SKIPS = 16
# A request preempted this often is failed rather than queued again. Running requests
# are kept in arrival order and the youngest is preempted first, so the oldest always
# progresses; this bound is the backstop against a request that never finishes.
MAX_PREEMPTIONS = 64


class ScheduledSeq(NamedTuple):
    """A sequence and how many of its uncomputed tokens run this step."""

    seq: Sequence
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the sequence's end, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    """Packs decode tokens first, then chunked prefill, under a per-step budget.

    ``budget`` (a ``StepBudget``; by default a fixed ``max_num_batched_tokens``)
    decides how many prefill tokens join the decode tokens of a step: with a step time
    target, as many as its cost model predicts keep the step within it. Decode tokens
    are always scheduled first, so a long prefill never stalls the streams already
    decoding. A long prompt is prefilled over several steps, never more than the
    budget at once; with a step time target, queued prompts that fit a step whole
    go before its next chunk.
    When blocks run out, the youngest running sequence is preempted: its computed
    blocks go to the prefix cache, so its recompute is mostly a cache hit.

    A sequence that can never get its blocks (``capacity``), or that was preempted
    ``max_preemptions`` times, is dropped with its error; ``take_failed`` hands these
    to the caller.
    """

    def __init__(
        self,
        blocks: BlockManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        capacity: KVCapacity | None = None,
        budget: StepBudget | None = None,
    ):
        self.blocks = blocks
        self.budget = budget if budget is not None else StepBudget(max_num_batched_tokens)
        self.max_num_seqs = max_num_seqs
        self.capacity = capacity
        self.max_preemptions = MAX_PREEMPTIONS
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self._failed: list[tuple[Sequence, Exception]] = []

    @property
    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        """Choose this step's work: every decoding sequence, then prefill chunks of the
        running sequences (oldest first), then new admissions, while the budget lasts."""
        budget = self.budget
        budget.start(waiting=len(self.waiting))
        scheduled: list[ScheduledSeq] = []
        preempted = False
        decoding = [seq for seq in self.running if _is_decoding(seq)]
        prefilling = [seq for seq in self.running if not _is_decoding(seq)]
        for seq in decoding + prefilling:
            if prefilling and seq is prefilling[0] and budget.adaptive:
                self._admit_short_first(scheduled, seq)
            if seq not in self.running:  # preempted earlier in this loop
                continue
            decode, context = _is_decoding(seq), seq.num_computed_tokens
            wanted = seq.num_uncomputed_tokens
            num = (
                min(wanted, budget.tokens_left) if decode else budget.prefill_room(context, wanted)
            )
            if num == 0:
                continue
            if not self._allocate_or_preempt(seq, num, scheduled):
                preempted = True
                continue
            scheduled.append(ScheduledSeq(seq, num))
            budget.take(context, num, prefill=not decode)
        if not preempted:
            self._admit(scheduled)
        return scheduled

    def _allocate_or_preempt(self, seq: Sequence, num: int, scheduled: list) -> bool:
        """Allocate for ``seq``, preempting younger sequences; False if ``seq`` itself went."""
        while not self.blocks.allocate(seq, num):
            victim = self.running[-1]
            self._preempt(victim, scheduled)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, scheduled: list[ScheduledSeq]) -> None:
        self.running.remove(seq)
        scheduled[:] = [s for s in scheduled if s.seq is not seq]
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        if seq.num_preemptions >= self.max_preemptions:
            self._fail(seq, KVCacheBusyError(seq.num_preemptions))
            return
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Drop ``seq`` (holding no blocks, in no queue) with ``error``."""
        seq.status = SequenceStatus.FINISHED
        self._failed.append((seq, error))

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        """The sequences dropped since the last call, each with its error."""
        failed, self._failed = self._failed, []
        return failed

    def _admit_short_first(self, scheduled: list[ScheduledSeq], long: Sequence) -> None:
        """Queued prompts that fit whole go before a long prompt's next chunk, so a
        short turn is not stuck behind a long one. The long prompt is passed over so at
        most ``MAX_SKIPS`` steps in a row: then it goes first for one step."""
        if long.deferred >= MAX_SKIPS:
            long.deferred = 0
            return
        before = len(scheduled)
        self._admit(scheduled, whole_only=True)
        if len(scheduled) > before:
            long.deferred += 1

    def _admit(self, scheduled: list[ScheduledSeq], whole_only: bool = False) -> None:
        """Admit waiting sequences while blocks and budget last. One that cannot get its
        blocks now is passed over for this step, so smaller ones behind it still run,
        until it has been passed over ``MAX_SKIPS`` times: then the queue waits for it.
        When the step has no time left for a first chunk, admission waits a step.
        ``whole_only``: only sequences whose whole prompt fits the step; one that does
        not is passed over (not counted), unless it was skipped ``MAX_SKIPS`` times."""
        passed: list[Sequence] = []
        budget = self.budget
        while budget.tokens_left > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting(passed)
            if seq is None or (whole_only and seq.skipped >= MAX_SKIPS):
                break
            if not self._can_ever_fit(seq):
                continue
            started = time.perf_counter()
            self.blocks.match_prefix(seq)
            seq.lookup_seconds += time.perf_counter() - started
            num = budget.prefill_room(seq.num_computed_tokens, seq.num_uncomputed_tokens)
            if num == 0:  # no time left in this step: unmatch, and try again next step
                self._unmatch(seq)
                break
            if whole_only and num < seq.num_uncomputed_tokens:
                self._unmatch(seq)
                passed.append(seq)
                continue
            if not self.blocks.allocate(seq, num):
                self._unmatch(seq)
                if seq.skipped >= MAX_SKIPS:
                    break
                passed.append(seq)
                continue
            self._take_waiting(seq)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.admitted_at = time.perf_counter()
            seq.status = SequenceStatus.RUNNING
            # Arrival order, so preemption (youngest first) never takes an older one.
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            budget.take(seq.num_computed_tokens, num, prefill=True)
            scheduled.append(ScheduledSeq(seq, num))

    def _unmatch(self, seq: Sequence) -> None:
        """Give back the prefix match of a sequence that stays waiting."""
        self.blocks.free(seq, cache_blocks=False)
        seq.num_computed_tokens = 0

    def _can_ever_fit(self, seq: Sequence) -> bool:
        """Check a waiting ``seq`` against what pins leave (they may have changed since
        it was added); one that can never fit is failed and leaves the queue."""
        if self.capacity is None:
            return True
        try:
            self.capacity.check(seq)
        except KVCacheExhaustedError as exc:
            self.waiting.remove(seq)
            self._fail(seq, exc)
            return False
        return True

    def _next_waiting(self, passed: list[Sequence]) -> Sequence | None:
        """Cache-aware choice: the longest cached prefix in the window, unless the head
        has waited through ``MAX_SKIPS`` admissions already (no starvation). Sequences
        in ``passed`` are left out; None when nothing is left."""
        window = [
            seq
            for seq in islice(self.waiting, ADMISSION_WINDOW + len(passed))
            if all(seq is not p for p in passed)
        ]
        if not window:
            return None
        head = window[0]
        if len(window) == 1 or head.skipped >= MAX_SKIPS or self.blocks.cache is None:
            return head
        hits = [self.blocks.cached_prefix_tokens(seq) for seq in window]
        return window[hits.index(max(hits))]

    def _take_waiting(self, seq: Sequence) -> None:
        for earlier in self.waiting:
            if earlier is seq:
                break
            earlier.skipped += 1
        self.waiting.remove(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED


def _is_decoding(seq: Sequence) -> bool:
    """Whether ``seq`` is past its prompt (decode tokens, or tokens a grammar forced),
    as opposed to prefilling it (or recomputing it after a preemption)."""
    return seq.num_computed_tokens >= seq.num_prompt_tokens
