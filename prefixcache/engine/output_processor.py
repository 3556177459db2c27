"""Per-request text and stop handling: detokenize, cut at stop strings, decide finish."""

from __future__ import annotations

import time

from prefixcache.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from prefixcache.engine.sequence import Sequence
from prefixcache.outputs import RequestDelta, RequestOutput, RequestTimings


class RequestState:
    """A request's sequence plus its streaming text state."""

    def __init__(self, seq: Sequence, tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.seq = seq
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_matcher = StopStringMatcher(seq.params.stop_strings)
        self.stop_ids = frozenset(seq.params.stop_token_ids or ())
        if not seq.params.ignore_eos:
            self.stop_ids |= eos_token_ids
        self.text = ""

    def append_token(
        self, token_id: int, max_model_len: int, grammar_done: bool = False
    ) -> RequestDelta:
        """Record a sampled token; set the finish reason when a stop condition holds
        (``grammar_done``: the request's grammar has ended, whatever ``ignore_eos``)."""
        seq = self.seq
        seq.append_token(token_id)
        if not seq.first_token_at:
            seq.first_token_at = time.perf_counter()
        if token_id in self.stop_ids or grammar_done:
            return self._finish("stop", self._drain())
        result = self.stop_matcher.feed(self.detokenizer.add(token_id))
        if result.stopped:
            return self._finish("stop", result.text)
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
            return self._finish("length", result.text + self._drain())
        return self._delta([token_id], result.text)

    def _drain(self) -> str:
        """Text still held back by the detokenizer and the stop matcher."""
        tail = self.stop_matcher.feed(self.detokenizer.flush())
        return tail.text if tail.stopped else tail.text + self.stop_matcher.flush()

    def abort(self) -> RequestDelta:
        """Finish the request because the caller gave up on it."""
        return self._finish("abort", "", token_ids=[])

    def fail(self, error: Exception) -> RequestDelta:
        """Finish the request because the engine could not go on with it."""
        return self._finish("error", "", token_ids=[])._replace(error=error)

    def _finish(self, reason: str, text: str, token_ids: list[int] | None = None) -> RequestDelta:
        self.seq.finish_reason = reason
        if token_ids is None:
            token_ids = [self.seq.last_token_id]
        return self._delta(token_ids, text)

    def _delta(self, token_ids: list[int], text: str) -> RequestDelta:
        self.text += text
        seq = self.seq
        return RequestDelta(
            seq.request_id,
            token_ids,
            text,
            seq.finish_reason,
            seq.num_prompt_tokens,
            seq.num_cached_tokens,
            self._timings() if seq.finish_reason is not None else None,
            logprobs=self._logprobs(len(token_ids)),
        )

    def _logprobs(self, num_tokens: int) -> list[float] | None:
        """The log-probs of the last ``num_tokens`` tokens (each sampled token has one)."""
        if not self.seq.params.logprobs:
            return None
        logprobs = self.seq.logprobs
        return list(logprobs[len(logprobs) - num_tokens :]) if num_tokens else []

    def _timings(self) -> RequestTimings | None:
        seq = self.seq
        if not seq.admitted_at or not seq.first_token_at:
            return None
        return RequestTimings(
            queued=max(seq.admitted_at - seq.added_at - seq.lookup_seconds, 0.0),
            lookup=seq.lookup_seconds,
            prefill=seq.first_token_at - seq.admitted_at,
            decode=time.perf_counter() - seq.first_token_at,
        )

    def output(self) -> RequestOutput:
        """The request's result so far."""
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=self.text,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=list(seq.logprobs) if seq.params.logprobs else None,
        )
