"""The SDK front: ``Engine``, the in-process way to run prefixcache.

It is composed of the parts the builder makes: an ``InputProcessor`` that validates
every prompt once, an ``EngineCore`` that steps requests, and the core's cache control.
Batch calls (``generate``, ``chat``, ``respond``, ``prewarm``) step the core on the
caller's thread until their requests finish.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from prefixcache.apps.conversations import (
    ConversationRenderer,
    Input,
    ResponseOutput,
    ResponseSession,
)
from prefixcache.apps.response_store import ResponseStore, StoredResponse
from prefixcache.cache.pins import PinHandle
from prefixcache.config import EngineConfig
from prefixcache.engine.builder import build_engine, resolve_config
from prefixcache.engine.stats import EngineStats
from prefixcache.inputs.processor import Prompt
from prefixcache.outputs import RequestDelta, RequestOutput
from prefixcache.sampling_params import SamplingParams

_PREFILL_ONLY = SamplingParams(max_tokens=1)


class Engine:
    """Serves Llama-family models over a paged KV cache with radix-tree prefix reuse."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        built = build_engine(config)
        self.core, self.inputs, self.limits = built.core, built.inputs, built.limits
        self.model_config = built.model_config
        self.control = self.core.control
        self._responses: ResponseSession | None = None

    @classmethod
    def from_pretrained(cls, model: str, **options) -> Engine:
        """Load ``model`` (a Hugging Face folder or hub id).

        Options: ``device``, ``dtype``, ``max_model_len``, ``kv_cache_tokens``,
        ``max_num_batched_tokens`` (resolved for the model and device when None), and
        any other ``EngineConfig`` field.
        """
        return cls(resolve_config(model, **options))

    def close(self) -> None:
        """Release what the engine holds outside this process's memory: with
        ``tensor_parallel_size`` > 1, stop its worker processes. Idempotent; the engine
        serves nothing afterwards."""
        self.core.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer."""
        return self.inputs.tokenizer

    # ----------------------------------------------------------------- requests

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        salt: str | None = None,
    ) -> str:
        """Validate and queue a prompt (text, token ids or an int array); returns its id."""
        params = params or SamplingParams()
        tokens = self.inputs.prompt_tokens(prompt)
        self.inputs.check_fits(len(tokens), params.max_tokens)
        return self.core.add(tokens, params, request_id, salt)

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown."""
        return self.core.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestDelta]:
        """Run one batched forward pass; returns what each touched request gained."""
        return self.core.step()

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
        return self._run_all([self.inputs.prompt_tokens(p) for p in batch], params, use_tqdm, salt)

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
        prompts = [self.inputs.chat_tokens(c) for c in conversations]
        return self._run_all(prompts, params, use_tqdm, salt)

    def respond(
        self,
        input: Input,
        previous: ResponseOutput | StoredResponse | str | None = None,
        instructions: str | None = None,
        params: SamplingParams | None = None,
        salt: str | None = None,
    ) -> ResponseOutput:
        """Reply to ``input`` (text or messages), continuing the response ``previous``.

        ``previous`` is an earlier ``ResponseOutput`` or its id (stored under the same
        ``salt``). Only the new input is tokenized; the prompt equals rendering the
        whole conversation.
        """
        return self.responses.respond(self, input, previous, instructions, params, salt)

    @property
    def responses(self) -> ResponseSession:
        """The conversations ``respond`` keeps (made on first use)."""
        if self._responses is None:
            renderer = ConversationRenderer(self.inputs)
            self._responses = ResponseSession(renderer, ResponseStore())
        return self._responses

    def _run_all(self, prompts, params, use_tqdm: bool, salt: str | None) -> list[RequestOutput]:
        """Run ``prompts`` to the end. A request the engine refuses or fails raises its
        error, and the batch's other requests are aborted (no state is left behind)."""
        param_list = _as_param_list(params, len(prompts))
        for p, sp in zip(prompts, param_list, strict=True):  # validate all before queueing any
            self.inputs.check_fits(len(p), sp.max_tokens)
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, param_list, strict=True):
                ids.append(self.core.add(p, sp, salt=salt))
            states = [self.core.requests[i] for i in ids]
            self._step_until_done(set(ids), use_tqdm)
        finally:
            for request_id in ids:  # left only when something failed
                self.core.abort(request_id)
        return [state.output() for state in states]

    def _step_until_done(self, pending: set[str], use_tqdm: bool) -> None:
        with tqdm(total=len(pending), disable=not use_tqdm, desc="generate") as bar:
            while pending:
                for delta in self.core.step():
                    if delta.finish_reason is not None and delta.request_id in pending:
                        if delta.error is not None:
                            raise delta.error
                        pending.discard(delta.request_id)
                        bar.update(1)

    # ------------------------------------------------------------ cache control

    def prewarm(
        self,
        prompt: Prompt | Sequence[dict],
        pin: bool = False,
        ttl: float | None = None,
        salt: str | None = None,
    ) -> PinHandle:
        """Prefill a prompt (text, token ids or a message list) into the cache, no reply.

        With ``pin`` the cached prefix is protected from eviction until ``unpin`` or
        until ``ttl`` seconds pass; a pin over the cap is refused before any work. A
        message list is rendered without the assistant header, so it is the prefix of
        any later conversation that extends it.
        """
        tokens = self.inputs.prewarm_tokens(prompt)
        if pin:
            self.control.check_pinnable(len(tokens), ttl, salt)
        self._run_all([tokens], _PREFILL_ONLY, False, salt)
        if pin:
            return self.control.pin(tokens, salt, ttl)
        return PinHandle(None, len(tokens), self.control.peek(tokens, salt), False)

    def unpin(self, handle: str | PinHandle) -> bool:
        """Release a pin made by ``prewarm(pin=True)``; False if it is unknown or expired."""
        return self.control.unpin(handle)

    def flush_cache(self) -> int:
        """Drop every device-cached entry that no request or pin holds; returns blocks
        freed. Tiers behind the device keep their chunks (they are bounded on their own)."""
        return self.control.flush()

    # ------------------------------------------------------------------- state

    def stats(self) -> dict[str, int]:
        """Counters: prefix-cache query/hit tokens per tier, evictions, block usage."""
        return self.core.snapshot().flat()

    def snapshot(self) -> EngineStats:
        """``stats()`` as one typed value, tiers listed generically."""
        return self.core.snapshot()

    def check_integrity(self) -> None:
        """Raise AssertionError if any block is leaked or double-owned."""
        self.core.check_integrity()

    @property
    def device(self) -> torch.device:
        """Where the model and the KV pools live."""
        return self.core.device


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
