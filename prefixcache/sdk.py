"""The engine: requests in, tokens out, with prefix reuse and continuous batching."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from chunking.segments import SegmentTokenizer
from kernels import get_backend
from prefixcache.cache.block_manager import BlockManager
from prefixcache.cache.control import CacheControl
from prefixcache.cache.kv_cache import KVCache, bytes_per_token
from prefixcache.cache.pins import PinRegistry
from prefixcache.config import EngineConfig
from prefixcache.engine.model_runner import ModelRunner, SequenceChunk
from prefixcache.engine.output_processor import RequestState
from prefixcache.engine.sampler import Sampler, make_generator
from prefixcache.engine.scheduler import ScheduledSeq, Scheduler
from prefixcache.engine.sequence import Sequence as Seq
from prefixcache.engine.sizing import (
    default_batched_tokens,
    default_device,
    resolve_kv_cache_tokens,
    resolve_max_model_len,
)
from prefixcache.inputs.tokenizer import (
    checked_tokens,
    eos_token_ids,
    load_tokenizer,
    validate_messages,
)
from prefixcache.models.config import ModelConfig
from prefixcache.models.fingerprint import model_fingerprint
from prefixcache.models.loader import load_model, resolve_dtype, resolve_model_path
from prefixcache.outputs import RequestDelta, RequestOutput
from prefixcache.sampling_params import SamplingParams
from prefixcache.tiers.tiered import build_tiers

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int] | np.ndarray  # text, token ids, or an int array of them


class Engine(CacheControl):
    """Serves Llama-family models over a paged KV cache with radix-tree prefix reuse."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        folder = config.model_path
        self.model_config = ModelConfig.from_folder(folder)
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config)
        self.tokenizer = load_tokenizer(folder)
        self.segments = SegmentTokenizer(self.tokenizer)
        self.eos_token_ids = eos_token_ids(folder, self.tokenizer, self.model_config.eos_token_ids)
        model = load_model(folder, self.model_config, self.dtype, self.device, config.load_format)
        kv_cache = KVCache(
            self.model_config, config.num_kv_blocks, config.block_size, self.dtype, self.device
        )
        backend = get_backend(config.attention_backend, self.device)
        self.runner = ModelRunner(model, kv_cache, backend, self.device)
        self.fingerprint = model_fingerprint(
            folder, self.model_config.architecture, str(self.dtype), config.load_format
        )
        self.blocks = BlockManager(
            config.num_kv_blocks,
            config.block_size,
            config.chunk_size,
            self.fingerprint,
            config.enable_prefix_caching,
            tiers=build_tiers(config, kv_cache, self.fingerprint),
        )
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_num_seqs)
        self.sampler = Sampler()
        self.pins = (
            PinRegistry(self.blocks.cache, config.pinned_token_cap)
            if self.blocks.cache is not None
            else None
        )
        self.requests: dict[str, RequestState] = {}
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
        max_num_batched_tokens: int | None = None,
        **kwargs,
    ) -> Engine:
        """Load ``model`` (a Hugging Face folder or hub id); see ``EngineConfig`` for options."""
        folder = resolve_model_path(model)
        model_config = ModelConfig.from_folder(folder)
        device = torch.device(device or default_device())
        torch_dtype = resolve_dtype(dtype, device, model_config)
        max_len = resolve_max_model_len(model_config, max_model_len)
        kv_tokens = resolve_kv_cache_tokens(
            kv_cache_tokens, bytes_per_token(model_config, torch_dtype), max_len, device
        )
        config = EngineConfig(
            model=str(folder),
            device=str(device),
            dtype=str(torch_dtype).removeprefix("torch."),
            max_model_len=max_len,
            kv_cache_tokens=kv_tokens,
            max_num_batched_tokens=max_num_batched_tokens or default_batched_tokens(device),
            **kwargs,
        )
        return cls(config)

    # ----------------------------------------------------------------- requests

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        salt: str | None = None,
    ) -> str:
        """Queue a prompt (text, token ids or an int array); returns its request id.

        Validates first; an int32 array is not copied.
        """
        return self.add_prompt_tokens(self.prompt_tokens(prompt), params, request_id, salt)

    def add_prompt_tokens(
        self,
        tokens: np.ndarray,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        salt: str | None = None,
    ) -> str:
        """Queue ids that ``prompt_tokens`` returned, without validating them again."""
        params = params or SamplingParams()
        self.check_fits(len(tokens), params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Seq(
            request_id=request_id,
            prompt=tokens,
            params=params,
            arrival=next(self._ids),
            salt=salt,
            generator=make_generator(params.seed, self.device),
            added_at=time.perf_counter(),
        )
        self.requests[request_id] = RequestState(seq, self.tokenizer, self.eos_token_ids)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.finish(state.seq)
        return state.abort()

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_work

    def step(self) -> list[RequestDelta]:
        """Run one batched forward pass; returns what each touched request gained."""
        if self.pins is not None:
            self.pins.expire()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        chunks = [
            SequenceChunk(
                s.seq.token_slice(
                    s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_tokens
                ),
                s.seq.num_computed_tokens,
                s.seq.block_ids,
            )
            for s in scheduled
        ]
        logits = self.runner.run(chunks)
        return self._advance(scheduled, logits)

    def _advance(self, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> list[RequestDelta]:
        completing = [i for i, s in enumerate(scheduled) if s.completes]
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_tokens
            self.blocks.cache_computed_blocks(s.seq)
        if not completing:
            return []
        seqs = [scheduled[i].seq for i in completing]
        sampled = self.sampler.sample(
            logits[completing], [s.params for s in seqs], [s.generator for s in seqs]
        )
        deltas = []
        for row, seq in enumerate(seqs):
            if sampled.logprobs is not None:
                seq.logprobs.append(sampled.logprobs[row])
            state = self.requests[seq.request_id]
            delta = state.append_token(sampled.token_ids[row], self.config.max_model_len)
            if delta.finish_reason is not None:
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            deltas.append(delta)
        return deltas

    # -------------------------------------------------------------- batch APIs

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs in the order of ``prompts``."""
        batch = _as_prompt_list(prompts)
        return self._run_all([self.prompt_tokens(p) for p in batch], params, use_tqdm, salt)

    def chat(
        self,
        conversations: Sequence[dict] | Sequence[Sequence[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        salt: str | None = None,
    ) -> list[RequestOutput]:
        """Reply to each OpenAI-style message list through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.prompt_tokens(self.chat_prompt_tokens(c)) for c in conversations]
        return self._run_all(prompts, params, use_tqdm, salt)

    def respond(
        self,
        input: str | Sequence[dict],
        previous=None,
        instructions: str | None = None,
        params: SamplingParams | None = None,
        salt: str | None = None,
    ):
        """Reply to ``input`` (text or messages), continuing the response ``previous``.

        ``previous`` is an earlier ``ResponseOutput`` or its id (stored under the same
        ``salt``). Only the new input is tokenized; the prompt equals rendering the
        whole conversation. Returns a ``prefixcache.apps.conversations.ResponseOutput``.
        """
        from prefixcache.apps.conversations import respond  # keeps engine.py's imports lean

        return respond(self, input, previous, instructions, params, salt)

    def chat_prompt_ids(
        self, messages: Sequence[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt token ids of one message list through the chat template."""
        return self.chat_prompt_tokens(messages, add_generation_prompt).tolist()

    def chat_prompt_tokens(
        self, messages: Sequence[dict], add_generation_prompt: bool = True
    ) -> np.ndarray:
        """``chat_prompt_ids`` as an int32 array (what ``add_request`` takes without a copy).

        Unchanged message segments are not re-tokenized (see ``SegmentTokenizer``).
        Safe to call from other threads than the one stepping the engine.
        """
        validate_messages(messages)
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate()")
        return self.segments.encode_chat(messages, add_generation_prompt)

    def _run_all(self, prompts, params, use_tqdm: bool, salt: str | None) -> list[RequestOutput]:
        param_list = _as_param_list(params, len(prompts))
        for p, sp in zip(prompts, param_list, strict=True):  # validate all before queueing any
            self.check_fits(len(p), sp)
        ids = [
            self.add_prompt_tokens(p, sp, salt=salt)
            for p, sp in zip(prompts, param_list, strict=True)
        ]
        states = [self.requests[i] for i in ids]
        pending = set(ids)
        with tqdm(total=len(ids), disable=not use_tqdm, desc="generate") as bar:
            while pending:
                for delta in self.step():
                    if delta.finish_reason is not None and delta.request_id in pending:
                        pending.discard(delta.request_id)
                        bar.update(1)
        return [state.output() for state in states]

    # ------------------------------------------------------------------ checks

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, or validated ids; ValueError on bad input."""
        return self.prompt_tokens(prompt).tolist()

    def prompt_tokens(self, prompt: Prompt) -> np.ndarray:
        """Validated token ids of a prompt as an int32 array; ValueError on bad input."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            prompt = self.tokenizer.encode(prompt)
        elif not isinstance(prompt, np.ndarray):
            prompt = list(prompt)
        return checked_tokens(prompt, self.model_config.vocab_size)

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """ValueError unless prompt plus max_tokens fits the model and the KV pool."""
        total = num_prompt_tokens + params.max_tokens
        limit = self.config.max_model_len
        if total > limit:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) "
                f"is {total} tokens, over max_model_len ({limit})"
            )
        capacity = self.config.num_kv_blocks * self.config.block_size
        if total > capacity:
            raise ValueError(
                f"prompt plus max_tokens ({total} tokens) exceeds the KV cache ({capacity} tokens)"
            )

    # ------------------------------------------------------------------- state

    def stats(self) -> dict:
        """Counters: prefix-cache query/hit tokens, evictions, block usage."""
        cache = self.blocks.cache
        result = {
            "num_blocks": self.config.num_kv_blocks,
            "free_blocks": self.blocks.pool.num_free,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }
        if cache is not None:
            result.update(asdict(cache.stats))
            result["cached_blocks"] = cache.num_cached_blocks
            result["evictable_blocks"] = cache.num_evictable_blocks
            result["locked_blocks"] = cache.num_locked_blocks
        tiers = self.blocks.tiers
        if tiers is not None:
            for tier in tiers.tier_stats():
                result.update({f"{tier.name}_{k}": v for k, v in tier.counters().items()})
            result.update(asdict(tiers.counters))
        return result

    def check_integrity(self) -> None:
        """Raise AssertionError if any block is leaked or double-owned."""
        if self.blocks.cache is not None:
            self.blocks.cache.check_integrity()
        if self.blocks.tiers is not None:
            self.blocks.tiers.check_integrity()
        owned = sum(len(s.seq.block_ids) - s.seq.num_locked_blocks for s in self.requests.values())
        cached = self.blocks.cache.num_cached_blocks if self.blocks.cache else 0
        total = self.blocks.pool.num_free + cached + owned
        assert total == self.config.num_kv_blocks, (
            f"block accounting broken: free {self.blocks.pool.num_free} + cached {cached} "
            f"+ owned by requests {owned} != {self.config.num_kv_blocks}"
        )


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, np.ndarray) and prompts.ndim == 1):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def _as_param_list(params, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params
