"""Per-request text and stop handling: detokenize, cut at stop strings, decide finish.

``TextStream`` is a request's text: the same code turns ids into text in the engine
(``RequestState``, in process) and in a front whose engine runs in another process
and sends ids only (``DeltaText``), so both give the same text for the same ids.
"""

from __future__ import annotations

import time

from prefixcache.engine.detokenizer import IncrementalDetokenizer, StopResult, StopStringMatcher
from prefixcache.engine.sequence import Sequence
from prefixcache.outputs import RequestDelta, RequestOutput, RequestTimings

_NO_TEXT = StopResult("", False)


class TextStream:
    """A request's output text: its ids detokenized one at a time, cut at the first
    stop string (no part of which is ever emitted)."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_matcher = StopStringMatcher(stop_strings)

    def add(self, token_id: int) -> StopResult:
        """Append ``token_id``: the text now safe to emit, and whether a stop string ended
        the output."""
        return self.stop_matcher.feed(self.detokenizer.add(token_id))

    def drain(self) -> str:
        """The text still held back, when the output ends for a reason of its own."""
        tail = self.stop_matcher.feed(self.detokenizer.flush())
        return tail.text if tail.stopped else tail.text + self.stop_matcher.flush()


class RequestState:
    """A request's sequence plus its streaming text state.

    With ``tokenizer`` None the request's deltas carry ids only (text "") and every one
    carries its timings: whoever detokenizes them (``DeltaText``) checks the stop
    strings and may end the request at any delta.
    """

    def __init__(self, seq: Sequence, tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.seq = seq
        stops = seq.params.stop_strings
        self.stream = TextStream(tokenizer, stops) if tokenizer is not None else None
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
        result = self.stream.add(token_id) if self.stream is not None else _NO_TEXT
        if result.stopped:
            return self._finish("stop", result.text)
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
            return self._finish("length", result.text + self._drain())
        return self._delta([token_id], result.text)

    def _drain(self) -> str:
        """Text still held back by the detokenizer and the stop matcher."""
        return self.stream.drain() if self.stream is not None else ""

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
            self._timings() if seq.finish_reason is not None or self.stream is None else None,
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


class DeltaText:
    """Gives the id-only deltas of an engine that does not detokenize (a
    ``RequestState`` without a tokenizer) the text and finish the engine would have
    given them: as vLLM's front-end output processor does, on the front's side.

    ``apply`` takes the request's deltas in order. When a stop string completes inside
    one, the delta returned ends the request there (``finish_reason`` "stop", ids and
    log-probs cut after the token that completed it) and ``stopped`` is set: the
    engine does not know, so the caller must abort the request there.
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.stream = TextStream(tokenizer, stop_strings)
        self.stopped = False

    def apply(self, delta: RequestDelta) -> RequestDelta:
        """``delta`` as the engine would have sent it had it detokenized."""
        if delta.finish_reason in ("abort", "error"):  # text held back is dropped, as there
            return delta
        ids, last, pieces = delta.token_ids, len(delta.token_ids) - 1, []
        for i, token_id in enumerate(ids):
            # Only the last id can end the request in the engine: an end-of-sequence or
            # stop id (or a grammar's end), never detokenized, or the length limit.
            if i == last and delta.finish_reason == "stop":
                pieces.append(self.stream.drain())
                break
            result = self.stream.add(token_id)
            pieces.append(result.text)
            if result.stopped:
                self.stopped = delta.finish_reason is None
                return _cut(delta, i + 1, "".join(pieces))
            if i == last and delta.finish_reason == "length":
                pieces.append(self.stream.drain())
        timings = delta.timings if delta.finish_reason is not None else None
        return delta._replace(text="".join(pieces), timings=timings)

    def apply_whole(self, delta: RequestDelta) -> RequestDelta:
        """``delta`` holding a request's every id at once (see ``FinalOnly``) with the
        text ``apply`` gives its deltas one by one, concatenated. For a request without
        stop strings only: nothing can end it early here."""
        if delta.finish_reason != "abort":
            return self.apply(delta)
        # An aborted stream keeps the text of its earlier deltas; the abort adds none.
        return delta._replace(text=self.apply(delta._replace(finish_reason=None)).text)


class FinalOnly:
    """Folds a request's deltas into one, for a caller that wants only the result
    (vLLM's ``RequestOutputKind.FINAL_ONLY``): ``add`` keeps each delta's ids, text and
    log-probs and returns None until the finishing delta, then the whole request as
    that delta (its finish reason, counts, timings and error) with every id, the
    text and the log-probs of all the deltas before it. So a caller sees the same
    request whether it took the deltas one by one or this one."""

    __slots__ = ("token_ids", "pieces", "logprobs")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.logprobs: list[float] | None = None

    def add(self, delta: RequestDelta) -> RequestDelta | None:
        """Keep ``delta``; the whole request once ``delta`` finishes it, else None."""
        self.token_ids += delta.token_ids
        self.pieces.append(delta.text)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += delta.logprobs
        if delta.finish_reason is None:
            return None
        text = "".join(self.pieces)
        return delta._replace(token_ids=self.token_ids, text=text, logprobs=self.logprobs)


def _cut(delta: RequestDelta, num_tokens: int, text: str) -> RequestDelta:
    """``delta`` ended by a stop string after its first ``num_tokens`` ids."""
    logprobs = delta.logprobs[:num_tokens] if delta.logprobs is not None else None
    ids = delta.token_ids[:num_tokens]
    return delta._replace(token_ids=ids, text=text, finish_reason="stop", logprobs=logprobs)
