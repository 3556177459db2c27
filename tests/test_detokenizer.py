"""Incremental detokenization and stop-string matching on a streamed output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prefixcache.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

# Multi-byte characters are rare enough in this corpus that BPE leaves several of
# them split across tokens (some tokens hold the end of one and the start of another).
CORPUS = [
    "café déjà vu, naïve résumé. The quick brown fox jumps over the lazy dog.",
    "中文 字符 中文测试 你好世界",
    "emoji 😀 🎉 👍🏽 hello world",
] * 20
SPECIALS = ["<s>", "</s>"]
ALPHABET = "abc xyz.,!é中文😀👍🏽🎉\n"


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _train_metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-style: "▁" marks a space, and decoding drops the first one."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", *SPECIALS, *byte_tokens], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


RAW = _train_tokenizer()
METASPACE = _train_metaspace_tokenizer()
HF = PreTrainedTokenizerFast(tokenizer_object=RAW)
TOKENIZERS = {"tokenizers": RAW, "transformers": HF}
VOCAB = RAW.get_vocab_size()


def _stream(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    """Every delta ``add`` returns for ``ids``, then the ``flush`` remainder."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


def test_tokenizer_splits_multibyte_characters_across_tokens():
    """Precondition of the tests below: some tokens hold only part of a character."""
    ids = RAW.encode("😀👍🏽中文é").ids
    assert any("\ufffd" in RAW.decode([i]) for i in ids)


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_valid_text_streams_whole_characters_as_soon_as_complete(name, text):
    tokenizer = TOKENIZERS[name]
    ids = RAW.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer)
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        delta = detok.add(token_id)
        assert "\ufffd" not in delta
        emitted += delta
        so_far = tokenizer.decode(ids[:n])
        assert so_far.startswith(emitted)
        if not so_far.endswith("\ufffd"):
            # No unfinished character at the end: everything decoded so far is out.
            assert emitted == so_far
    assert emitted + detok.flush() == text


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB - 1), max_size=30))
def test_deltas_add_up_to_the_full_decode_for_any_ids(name, skip_special_tokens, ids):
    tokenizer = TOKENIZERS[name]
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(_stream(tokenizer, ids, skip_special_tokens)) == full


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_word_spaces_survive_a_decoder_that_strips_the_first_space(text):
    ids = METASPACE.encode(text).ids
    assert "".join(_stream(METASPACE, ids)) == METASPACE.decode(ids)


def test_special_tokens_are_skipped_by_default_and_kept_on_request():
    bos, eos = (RAW.token_to_id(s) for s in SPECIALS)
    ids = [bos, *RAW.encode("hi 中文").ids, eos]
    assert "".join(_stream(RAW, ids)) == "hi 中文"
    assert "".join(_stream(RAW, ids, skip_special_tokens=False)) == "<s>hi 中文</s>"


def test_incomplete_character_is_flushed_as_replacement_at_the_end():
    ids = RAW.encode("a😀").ids
    streamed = _stream(RAW, ids[:-1])
    assert "\ufffd" not in "".join(streamed[:-1])
    assert streamed[-1].endswith("\ufffd")


class _CountingDecoder:
    """Wraps a tokenizer and records how many ids each decode call saw."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_only_a_short_window_of_recent_tokens():
    ids = RAW.encode("the quick brown fox 中文 😀 " * 30).ids
    counting = _CountingDecoder(RAW)
    assert "".join(_stream(counting, ids)) == RAW.decode(ids)
    assert len(ids) > 300
    assert max(counting.lengths) <= 8


def _stream_stops(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    """Emitted pieces (flushed if not stopped) and whether a stop string matched."""
    matcher = StopStringMatcher(stops)
    pieces = []
    for delta in deltas:
        result = matcher.feed(delta)
        pieces.append(result.text)
        if result.stopped:
            return pieces, True
    return [*pieces, matcher.flush()], False


def test_stop_string_split_across_deltas_is_caught_and_never_leaks():
    pieces, stopped = _stream_stops(["STOP"], ["hello S", "T", "O", "P world"])
    assert stopped
    assert pieces == ["hello ", "", "", ""]


def test_held_back_text_is_released_when_it_is_not_a_stop_string():
    pieces, stopped = _stream_stops(["STOP"], ["a ST", "ART b"])
    assert not stopped
    assert pieces == ["a ", "START b", ""]


def test_flush_returns_the_held_back_tail():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abcSTO") == ("abc", False)
    assert matcher.flush() == "STO"


def test_stop_string_inside_one_delta_returns_the_text_before_it():
    assert _stream_stops(["\n\n"], ["one\n\ntwo"]) == (["one"], True)


@pytest.mark.parametrize(
    ("stops", "deltas", "expected"),
    [
        (["abc", "ab"], ["xa", "bc"], "x"),
        (["ab", "abc"], ["xabc"], "x"),
        (["lo w", "world"], ["hello world"], "hel"),
        # "b" completes before "abc" does, so generation stops there.
        (["abc", "b"], ["xabc"], "xa"),
        (["abc", "b"], ["xa", "b", "c"], "xa"),
    ],
)
def test_first_completed_stop_string_wins(stops, deltas, expected):
    pieces, stopped = _stream_stops(stops, deltas)
    assert stopped
    assert "".join(pieces) == expected


def test_nothing_is_emitted_after_a_stop():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("ax") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_without_stop_strings_text_passes_straight_through():
    matcher = StopStringMatcher([])
    assert [matcher.feed(d) for d in ["ab", "", "c"]] == [("ab", False), ("", False), ("c", False)]
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["a", ""])


def _expected_cut(text: str, stops: list[str]) -> str:
    """``text`` up to the stop string that completes first, from the whole text."""
    for end in range(len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)]
    return text


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_streamed_output_matches_cutting_the_whole_text(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    pieces, _ = _stream_stops(stops, deltas)
    assert "".join(pieces) == _expected_cut(text, stops)
