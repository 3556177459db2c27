"""A request's deltas in the engine-process client, on their way to its caller.

The engine process sends token ids; here they get their text (``DeltaText``: the
engine's own incremental detokenizer and stop strings) and, for a caller that wants
only the result, are folded into one delta (``FinalOnly``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prefixcache.engine.errors import RequestFailedError
from prefixcache.engine.loop import DeltaQueue
from prefixcache.engine.output_processor import DeltaText, FinalOnly
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestStream:
    """Where a request's deltas go (``loop``, ``queue``), and its text so far.

    ``final`` (a caller that wants only the result) folds the deltas. Without stop
    strings nothing can end the request early: the engine process folds its ids
    (``Add.final_only``) and sends one delta at the end, which is detokenized once
    here (``text_at_end``). With them, each step's ids come and are detokenized here
    as for a stream, so that a stop string still ends the request at once, and are
    folded here.
    """

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    text: DeltaText
    final: FinalOnly | None = None
    text_at_end: bool = False

    @classmethod
    def open(cls, tokenizer, params: SamplingParams, final_only: bool) -> RequestStream:
        """A stream for a request of the running event loop."""
        text = DeltaText(tokenizer, params.stop_strings)
        loop, queue = asyncio.get_running_loop(), DeltaQueue()
        if not final_only:
            return cls(loop, queue, text)
        return cls(loop, queue, text, FinalOnly(), text_at_end=not params.stop_strings)

    @property
    def stopped(self) -> bool:
        """Ended here (a stop string, or a failure to detokenize): the engine must be
        told to abort the request, and its later deltas dropped."""
        return self.text.stopped

    def output(self, delta: RequestDelta) -> RequestDelta | None:
        """What the caller gets of this step: the delta with its text, or for a caller
        that wants only the result, None until the finishing delta."""
        if self.final is None:
            return self._with_text(delta)
        if not self.text_at_end:
            return self.final.add(self._with_text(delta))
        whole = self.final.add(delta)
        return None if whole is None else self._with_text(whole, whole=True)

    def _with_text(self, delta: RequestDelta, whole: bool = False) -> RequestDelta:
        """The delta with its text (``whole``: the folded delta of a request without stop
        strings); a failure to detokenize fails this request only, as in the engine."""
        try:
            return self.text.apply_whole(delta) if whole else self.text.apply(delta)
        except Exception as exc:
            logger.exception("request %s failed while detokenizing", delta.request_id)
            error = RequestFailedError("the engine failed while running this request")
            error.__cause__ = exc
            self.text.stopped = True  # aborting a request the engine ended is a no-op
            return delta._replace(token_ids=[], text="", finish_reason="error", error=error)
