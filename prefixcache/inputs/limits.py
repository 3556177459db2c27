"""What an engine accepts and runs with: one frozen value, the same in every process."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The facts a front (the SDK, the HTTP server, a router) needs about an engine.

    Built once by the engine builder from its ``EngineConfig`` and the loaded model; a
    front checks requests against it without reaching into the engine.
    """

    model: str  # the model folder or hub id the engine loaded
    vocab_size: int
    max_model_len: int
    block_size: int
    chunk_size: int
    kv_cache_tokens: int  # device KV pool, in tokens
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_caching: bool
    fingerprint: str  # names the weights, dtype and layout whose KV the cache holds
    device: str
    dtype: str
    attention_backend: str  # the backend actually running, not the one asked for
    host_cache_tokens: int = 0
    disk_cache_dir: str | None = None
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), int8 or fp8
    kv_bytes_per_token: int = 0  # device KV bytes per token over all layers, scales included

    @property
    def max_context_tokens(self) -> int:
        """Most prompt plus output tokens one request can have (model limit and KV pool)."""
        usable = self.kv_cache_tokens // self.block_size * self.block_size
        return min(self.max_model_len, usable)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError unless a prompt plus ``max_tokens`` fits the model and the KV pool.

        The one length check: every front calls it once, before queueing a request.
        """
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                f"is {total} tokens, over max_model_len ({self.max_model_len})"
            )
        capacity = self.kv_cache_tokens // self.block_size * self.block_size
        if total > capacity:
            raise ValueError(
                f"prompt plus max_tokens ({total} tokens) exceeds the KV cache ({capacity} tokens)"
            )
