"""The engine core: add requests, abort them, and step the batch. Nothing else.

It takes prompts already validated by an ``InputProcessor`` (the SDK front and every
``EngineClient`` validate once, before queueing), so it never tokenizes or checks
lengths itself; it does check what the KV cache can hold now that pins may take part
of it. Whoever owns a core calls it from one thread only.

A step that raises (the model, the sampler) fails the requests in that step, not the
core: their finishing deltas carry the error and their blocks are released.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from prefixcache.cache.block_manager import BlockManager
from prefixcache.cache.control import CacheControl
from prefixcache.cache.events import CacheEventCallback
from prefixcache.config import EngineConfig
from prefixcache.engine.capacity import KVCapacity
from prefixcache.engine.errors import EngineDeadError, RequestFailedError
from prefixcache.engine.model_runner import ModelRunner, SequenceChunk
from prefixcache.engine.output_processor import RequestState
from prefixcache.engine.sampler import Sampler, make_generator
from prefixcache.engine.scheduler import ScheduledSeq, Scheduler
from prefixcache.engine.sequence import Sequence
from prefixcache.engine.stats import DeviceBlocks, EngineStats
from prefixcache.engine.step_cost import StepBudget, StepShape
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams
from prefixcache.structured import GrammarCache, MaskFiller, PendingMask, RequestGrammar
from prefixcache.tiers.stats import TierStats

logger = logging.getLogger(__name__)


class EngineCore:
    """Continuous batching over a paged KV cache with radix-tree prefix reuse.

    ``control`` is the cache control (pins, flush) over the same blocks. ``grammars``
    compiles the constraints of structured requests (shared with the input processor,
    which compiled them first while validating).
    """

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        blocks: BlockManager,
        tokenizer,
        eos_token_ids: frozenset[int],
        grammars: GrammarCache | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.blocks = blocks
        self.tokenizer = tokenizer  # detokenizes outputs
        self.eos_token_ids = eos_token_ids
        self.device = runner.device
        self.control = CacheControl(
            blocks,
            config.pinned_token_cap,
            config.max_pinned_tokens_per_tenant,
            cache_salt=runner.cache_salt,
        )
        self.capacity = KVCapacity(blocks, self.control.pins)
        target = config.step_time_target_ms / 1000 or None  # 0: a fixed token budget
        budget = StepBudget(config.max_num_batched_tokens, target)
        self.scheduler = Scheduler(
            blocks, config.max_num_batched_tokens, config.max_num_seqs, self.capacity, budget
        )
        self.sampler = Sampler()
        self.grammars = grammars
        vocab = grammars.vocab_size if grammars is not None else 0
        # Filling masks beside the forward pays only where the forward frees the GIL.
        self.masks = MaskFiller(vocab, overlap=self.device.type != "cpu")
        self.requests: dict[str, RequestState] = {}
        self.failed_steps = 0  # consecutive steps that raised; 0 after one that did not
        self._ids = itertools.count()

    def add(
        self,
        tokens: np.ndarray,
        params: SamplingParams,
        request_id: str | None = None,
        salt: str | None = None,
        detokenize: bool = True,
    ) -> str:
        """Queue validated prompt ids (an int32 array, not copied); returns the request id.

        With ``detokenize`` False the request's deltas carry ids without text and stop
        strings are not checked here: the caller detokenizes (``DeltaText``) and
        aborts the request when one of them ends it.

        Raises ``KVCacheExhaustedError`` (a ValueError) when the prompt plus
        ``max_tokens`` can never fit in what the pins leave of the KV cache.
        """
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        salt = self.runner.cache_salt(len(tokens), salt)
        self.capacity.check_prompt(tokens, params.max_tokens, salt)
        grammar = self._grammar(params)
        seq = Sequence(
            request_id=request_id,
            prompt=tokens,
            params=params,
            arrival=next(self._ids),
            salt=salt,
            generator=make_generator(params.seed, self.device),
            added_at=time.perf_counter(),
            grammar=grammar,
        )
        tokenizer = self.tokenizer if detokenize else None
        self.requests[request_id] = RequestState(seq, tokenizer, self.eos_token_ids)
        self.scheduler.add(seq)
        return request_id

    def _grammar(self, params: SamplingParams) -> RequestGrammar | None:
        """A fresh matcher for a constrained request (a ``GrammarError`` if its
        constraint cannot compile); never shared, even by requests with one prefix."""
        if params.structured is None:
            return None
        if self.grammars is None:
            raise ValueError("this engine was built without structured output support")
        return RequestGrammar(self.grammars.compile(params.structured), params.jump_forward)

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.finish(state.seq)
        return state.abort()

    def subscribe_cache_events(self, callback: CacheEventCallback) -> Callable[[], None]:
        """Call ``callback(events: list[ChunkEvent])`` once per step (and per cache command)
        in which full chunks entered the device cache or left this engine's last local
        tier; returns a function that unsubscribes. See ``prefixcache.cache.events``."""
        return self.blocks.events.subscribe(callback)

    def publish_cache_events(self) -> None:
        """Hand the chunk events recorded since the last call to the subscribers."""
        self.blocks.events.publish()

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_work

    def step(self) -> list[RequestDelta]:
        """Run one batched forward pass; returns what each touched request gained.

        Requests the step could not serve end with a delta whose ``error`` is set.
        """
        try:
            return self._step()
        finally:
            self.publish_cache_events()  # one batch per step

    def _step(self) -> list[RequestDelta]:
        self.control.expire()
        scheduled = self.scheduler.schedule()
        deltas = [self._fail(seq, exc) for seq, exc in self.scheduler.take_failed()]
        if not scheduled:
            return deltas
        completing = [i for i, s in enumerate(scheduled) if s.completes]  # before advancing
        seqs = [scheduled[i].seq for i in completing]
        shape, started = _shape(scheduled), time.perf_counter()
        # The masks depend only on tokens already accepted: fill them during the forward.
        pending = self.masks.start([s.grammar for s in seqs])
        try:
            logits = self.runner.run([self._chunk(s) for s in scheduled])
            sampled = self._sample(seqs, logits[completing], pending) if seqs else None
        except EngineDeadError:
            _settle(pending)
            raise  # not this step's failure: the engine's (a tensor-parallel worker died)
        except Exception as exc:
            _settle(pending)  # no matcher may still be in use once the requests fail
            # Nothing was advanced: the KV written went to blocks the failed requests
            # own (never to cached ones), so releasing them leaves the cache sound.
            self.failed_steps += 1
            logger.exception("engine step failed; failing its %d request(s)", len(scheduled))
            error = RequestFailedError("the engine failed while running this request")
            error.__cause__ = exc
            return deltas + [self._fail(s.seq, error) for s in scheduled]
        self.failed_steps = 0
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_tokens
            self.blocks.cache_computed_blocks(s.seq)
        if sampled is not None:
            deltas += self._append_sampled(seqs, sampled)
        if self.scheduler.budget.cost is not None:  # the adaptive budget learns the device
            self.scheduler.budget.cost.observe(shape, time.perf_counter() - started)
        return deltas

    def _chunk(self, s: ScheduledSeq) -> SequenceChunk:
        return _chunk(s, self.runner.uses_long_rope(s.seq.num_prompt_tokens))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, pending: PendingMask | None):
        bitmask = pending.result() if pending is not None else None
        return self.sampler.sample(
            logits, [s.params for s in seqs], [s.generator for s in seqs], bitmask
        )

    def _append_sampled(self, seqs: list[Sequence], sampled) -> list[RequestDelta]:
        deltas = []
        for row, seq in enumerate(seqs):
            if sampled.logprobs is not None:
                seq.logprobs.append(sampled.logprobs[row])
            state = self.requests[seq.request_id]
            try:
                delta = self._append(state, sampled.token_ids[row])
            except Exception as exc:  # e.g. the detokenizer: this request's failure only
                logger.exception("request %s failed on its new token", seq.request_id)
                error = RequestFailedError("the engine failed while running this request")
                error.__cause__ = exc
                deltas.append(self._fail(seq, error))
                continue
            if delta.finish_reason is not None:
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            deltas.append(delta)
        return deltas

    def _append(self, state: RequestState, token_id: int) -> RequestDelta:
        """Append a sampled token (and, with jump-forward, the tokens its grammar forces
        next, which the next step prefills); the request's delta."""
        seq, max_len = state.seq, self.config.max_model_len
        grammar: RequestGrammar | None = seq.grammar
        if grammar is None:
            return state.append_token(token_id, max_len)
        grammar.accept(token_id)
        delta = state.append_token(token_id, max_len, grammar.is_terminated)
        if delta.finish_reason is None and grammar.jump_forward:
            room = min(seq.params.max_tokens - seq.num_output_tokens, max_len - seq.num_tokens)
            for forced in grammar.forced_tokens(room - 1):  # one left to sample after them
                more = state.append_token(forced, max_len)
                delta = more._replace(
                    token_ids=delta.token_ids + more.token_ids, text=delta.text + more.text
                )
                if more.finish_reason is not None:  # a stop string inside the forced text
                    break
        return delta

    def _fail(self, seq: Sequence, error: Exception) -> RequestDelta:
        """End ``seq`` with ``error``, releasing its blocks; its finishing delta."""
        self.scheduler.finish(seq)
        return self.requests.pop(seq.request_id).fail(error)

    # ------------------------------------------------------------------- state

    def snapshot(self) -> EngineStats:
        """Counters and sizes now, one typed value (see ``EngineStats``)."""
        cache, pool, tiers = self.blocks.cache, self.blocks.pool, self.blocks.tiers
        counters = cache.stats if cache is not None else None
        device = DeviceBlocks(
            total=pool.num_blocks,
            free=pool.num_free,
            cached=cache.num_cached_blocks if cache else 0,
            evictable=cache.num_evictable_blocks if cache else 0,
            locked=cache.num_locked_blocks if cache else 0,
        )
        device_tier = TierStats(
            name="device",
            capacity_blocks=pool.num_blocks,
            used_blocks=device.cached,
            hit_tokens=counters.hit_tokens if counters else 0,
            evicted_blocks=counters.evicted_blocks if counters else 0,
        )
        return EngineStats(
            prefix_caching=cache is not None,
            block_size=self.config.block_size,
            device=device,
            tiers=(device_tier, *(tiers.tier_stats() if tiers is not None else ())),
            query_tokens=counters.query_tokens if counters else 0,
            pins=self.control.pin_stats(),
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            offloaded_bytes=tiers.counters.offloaded_bytes if tiers is not None else 0,
            onloaded_bytes=tiers.counters.onloaded_bytes if tiers is not None else 0,
            kv_bytes_per_token=self.runner.kv_cache.bytes_per_token,
        )

    def check_integrity(self) -> None:
        """Raise AssertionError if any block is leaked or double-owned."""
        cache, tiers, pool = self.blocks.cache, self.blocks.tiers, self.blocks.pool
        if cache is not None:
            cache.check_integrity()
        if tiers is not None:
            tiers.check_integrity()
        owned = sum(len(s.seq.block_ids) - s.seq.num_locked_blocks for s in self.requests.values())
        cached = cache.num_cached_blocks if cache else 0
        total = pool.num_free + cached + owned
        assert total == pool.num_blocks, (
            f"block accounting broken: free {pool.num_free} + cached {cached} "
            f"+ owned by requests {owned} != {pool.num_blocks}"
        )
        if self.blocks.window is not None:
            seqs = (s.seq for s in self.requests.values())
            self.blocks.window.check_integrity(seqs, self.blocks.pool)


def _settle(pending: PendingMask | None) -> None:
    """Wait for a mask fill whose step failed; its own failure adds nothing."""
    if pending is not None:
        try:
            pending.result()
        except Exception:
            logger.debug("mask fill of a failed step also failed", exc_info=True)


def _shape(scheduled: list[ScheduledSeq]) -> StepShape:
    """The step's work as the cost model prices it (before the sequences advance)."""
    shape = StepShape()
    for s in scheduled:
        shape = shape.plus(s.seq.num_computed_tokens, s.num_tokens)
    return shape


def _chunk(s: ScheduledSeq, long_rope: bool) -> SequenceChunk:
    """The tokens ``s`` computes this step, where they start, and its blocks."""
    seq, start = s.seq, s.seq.num_computed_tokens
    tokens = seq.token_slice(start, start + s.num_tokens)
    return SequenceChunk(tokens, start, seq.block_ids, long_rope, seq.local_block_ids)
