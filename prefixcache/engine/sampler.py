"""Pick the next token for every request in a batch at once.

Greedy rows take the argmax. Sampled rows go through temperature, top-k and top-p
(one sort for the whole batch), then an exponential race: ``argmax(probs / q)`` with
``q ~ Exp(1)`` picks token ``i`` with probability ``probs[i]``. Each row with its own
generator draws its ``q`` from it, so a seeded request gets the same tokens whatever
else is in the batch and wherever its row sits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from prefixcache.sampling_params import SamplingParams
from prefixcache.structured.bitmask import TokenBitmask


class SamplerOutput(NamedTuple):
    """One chosen token per row, and its log-prob when any request asked for it."""

    token_ids: list[int]
    # log_softmax of the logits (temperature 1, no filters; a constrained row's after
    # its grammar mask, the distribution it was drawn from) at the chosen token.
    logprobs: list[float] | None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``, or None when there is no seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Samples a whole batch of logits in one call.

    ``generator`` feeds the rows that have no generator of their own; None means
    torch's global generator for the logits' device.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        bitmask: TokenBitmask | None = None,
    ) -> SamplerOutput:
        """Choose one token per row of ``logits`` [B, V].

        ``params[i]`` and ``generators[i]`` belong to row ``i``; greedy rows ignore
        their generator and draw no randomness. ``bitmask`` forbids, in the rows it
        constrains, every token their grammars do not allow, before any sampling mode.
        """
        if not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(
                f"need one params and one generator per row: {logits.shape[0]} rows, "
                f"{len(params)} params, {len(generators)} generators"
            )
        logits = logits.float()
        if bitmask is not None:
            bitmask.apply(logits)
        token_ids = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            chosen = self._sample_rows(
                logits[index], [params[i] for i in rows], [generators[i] for i in rows]
            )
            token_ids[index] = chosen
        logprobs = None
        if any(p.logprobs for p in params):
            logprobs = _chosen_logprobs(logits, token_ids).tolist()
        return SamplerOutput(token_ids.tolist(), logprobs)

    def _sample_rows(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        temperature, top_k, top_p = _param_tensors(params, logits.shape[-1], logits.device)
        scaled = logits / temperature.unsqueeze(-1)
        if any(p.top_k or p.top_p < 1.0 for p in params):
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        return (probs / self._exponential_noise(probs, generators)).argmax(dim=-1)

    def _exponential_noise(
        self, probs: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        """Exp(1) noise shaped like ``probs``; each seeded row uses only its generator."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            noise[unseeded] = torch.empty(
                len(unseeded), probs.shape[-1], device=probs.device
            ).exponential_(generator=self.generator)
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return noise


def _param_tensors(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature, top-k (0 means the whole vocabulary) and top-p."""
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    return temperature, top_k.clamp(max=vocab_size), top_p


def _filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its nucleus.

    The nucleus is the smallest set of most likely tokens (after top-k) whose mass
    reaches top-p; the most likely token is always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    outside = rank >= top_k.unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Mass of the strictly more likely tokens: once it reaches top_p the set is
    # complete, so this token is not needed. Rank 0 has mass 0 < top_p: always kept.
    # top_p == 1 keeps everything even where rounding pushes the cumsum past 1.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    outside |= (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1.0).unsqueeze(-1)
    # A top_p below float32's smallest value rounds to 0 and would drop rank 0 too.
    outside[:, 0] = False
    drop = torch.empty_like(outside).scatter_(-1, order, outside)
    return logits.masked_fill(drop, float("-inf"))


def _chosen_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax of ``logits`` at each row's chosen token."""
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
