"""``DeltaText``: a front detokenizing an engine's id-only deltas gets the deltas the
engine would have sent had it detokenized them itself (``RequestState`` with a
tokenizer), however the ids are grouped into deltas and however the request ends."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_detokenizer import ALPHABET, HF

from prefixcache.engine.output_processor import DeltaText, FinalOnly, RequestState
from prefixcache.engine.sequence import Sequence
from prefixcache.outputs import RequestDelta
from prefixcache.sampling_params import SamplingParams

EOS = HF.convert_tokens_to_ids("</s>")


def _engine_deltas(ids: list[int], params: SamplingParams, tokenizer) -> list[RequestDelta]:
    """One delta per id, as ``EngineCore`` makes them (a tokenizer, or ids only)."""
    seq = Sequence("r", np.zeros(3, dtype=np.int32), params, arrival=0)
    state, deltas = RequestState(seq, tokenizer, frozenset({EOS})), []
    for token_id in ids:
        seq.logprobs.append(-0.5 * len(seq.logprobs))  # one distinct log-prob per token
        deltas.append(state.append_token(token_id, max_model_len=10_000))
        if deltas[-1].finish_reason is not None:
            break
    return deltas


def _grouped(deltas: list[RequestDelta], sizes: list[int]) -> list[RequestDelta]:
    """Consecutive deltas merged into one per group, as jump-forward's forced ids come."""
    out, start = [], 0
    for size in [*sizes, len(deltas)]:
        group = deltas[start : start + max(size, 1)]
        if not group:
            break
        out.append(group[-1]._replace(
            token_ids=[t for d in group for t in d.token_ids],
            text="".join(d.text for d in group),
            logprobs=[p for d in group for p in d.logprobs],
        ))  # fmt: skip
        start += len(group)
    return out


def _seen(deltas: list[RequestDelta]) -> list[tuple]:
    return [(d.token_ids, d.text, d.finish_reason, d.logprobs) for d in deltas]


def _front(deltas: list[RequestDelta], stops: tuple[str, ...]) -> tuple[list[RequestDelta], bool]:
    """The id-only deltas through ``DeltaText`` up to the one that ends the request;
    whether the front ended it (and so must abort it in the engine)."""
    text, out = DeltaText(HF, stops), []
    for delta in deltas:
        out.append(text.apply(delta))
        if out[-1].finish_reason is not None:
            break
    return out, text.stopped


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=30),
    stop_at=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 4)), max_size=2),
    sizes=st.lists(st.integers(1, 4), max_size=12),
    max_tokens=st.integers(1, 40),
    eos=st.booleans(),
    stop_id_at=st.none() | st.integers(0, 30),
)
def test_front_deltas_equal_the_engines_own(text, stop_at, sizes, max_tokens, eos, stop_id_at):
    ids = HF.encode(text) + ([EOS] if eos else [])
    stops = tuple(s for a, n in stop_at if (s := text[a : a + n]))
    # An ordinary token as a stop id: it ends the output and is never detokenized.
    stop_ids = [ids[stop_id_at % len(ids)]] if stop_id_at is not None else None
    params = SamplingParams(max_tokens, stop=stops, stop_token_ids=stop_ids, logprobs=True)
    expected = _grouped(_engine_deltas(ids, params, HF), sizes)
    id_only = _grouped(_engine_deltas(ids, params, None), sizes)
    got, front_stopped = _front(id_only, stops)
    assert _seen(got) == _seen(expected)
    # The front ends the request itself exactly when the engine would not have.
    engine_finish = id_only[len(got) - 1].finish_reason
    assert front_stopped == (got[-1].finish_reason == "stop" and engine_finish is None)


def test_a_length_finish_releases_a_held_back_partial_character():
    ids = HF.encode("😀👍🏽")
    # Cut inside a character: its decode so far ends in U+FFFD, which is held back.
    cut = next(n for n in range(1, len(ids)) if HF.decode(ids[:n]).endswith("\ufffd"))
    params = SamplingParams(max_tokens=cut)
    got, _ = _front(_engine_deltas(ids, params, None), ())
    assert got[-1].finish_reason == "length" and got[-1].text.endswith("\ufffd")
    assert _seen(got) == _seen(_engine_deltas(ids, params, HF))


def test_abort_and_error_deltas_pass_through_with_no_text():
    text = DeltaText(HF, ("x",))
    text.apply(RequestDelta("r", HF.encode("ab"), "", None, 3, 0))
    for reason in ("abort", "error"):
        delta = RequestDelta("r", [], "", reason, 3, 0)
        assert text.apply(delta) == delta


def _folded(deltas: list[RequestDelta]) -> RequestDelta:
    final = FinalOnly()
    folded = [whole for d in deltas if (whole := final.add(d)) is not None]
    assert len(folded) == 1 and folded[0] is not None  # only the finishing delta
    return folded[0]


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=30),
    max_tokens=st.integers(1, 40),
    eos=st.booleans(),
    abort_at=st.none() | st.integers(0, 30),
)
def test_a_folded_request_detokenized_once_equals_its_deltas_added_up(
    text, max_tokens, eos, abort_at
):
    # What a front that wants only the result gets from an engine process that folds
    # the id-only deltas (no stop strings), against the engine's own deltas added up.
    ids = HF.encode(text) + ([EOS] if eos else [])
    params = SamplingParams(max_tokens, logprobs=True)
    expected, id_only = _engine_deltas(ids, params, HF), _engine_deltas(ids, params, None)
    if abort_at is None or abort_at >= len(expected) - 1:
        # Not aborted, unless the ids ran out before any finish.
        abort_at = None if expected[-1].finish_reason is not None else len(expected)
    if abort_at is not None:
        expected, id_only = expected[:abort_at], id_only[:abort_at]
        aborted = RequestDelta("r", [], "", "abort", 3, 0, logprobs=[])
        expected, id_only = [*expected, aborted], [*id_only, aborted]
    got = DeltaText(HF, ()).apply_whole(_folded(id_only))
    assert _seen([got]) == _seen([_folded(expected)])
    assert got.text == "".join(d.text for d in expected)
