"""Conversations continued from a stored response: ``Engine.respond`` and the store."""

from __future__ import annotations

import numpy as np
import pytest

from prefixcache import Engine, SamplingParams
from prefixcache.apps.response_store import ResponseStore, StoredResponse

BLOCK = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
STORY = "Tell me a long story about a cache that remembered every prefix it saw. " * 3


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine.from_pretrained(
        str(tiny_llama), device="cpu", kv_cache_tokens=4096, max_model_len=2048
    )


def _whole(engine: Engine, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return engine.tokenizer.encode(text, add_special_tokens=False)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_continued_prompt_equals_rendering_the_whole_conversation(engine):
    renderer = engine.responses.renderer
    appends = renderer.appends
    messages = [{"role": "system", "content": "Answer briefly."}]
    previous = None
    for question in (STORY, "What happened next?", "And how did it end?"):
        reply = engine.respond(question, previous, instructions="Answer briefly.", params=GREEDY)
        messages.append({"role": "user", "content": question})
        assert reply.prompt_token_ids == _whole(engine, messages, True)
        messages.append({"role": "assistant", "content": reply.text})
        # What is stored is the template's rendering of the reply's text, not its raw ids.
        assert reply.stored.token_ids.tolist() == _whole(engine, messages, False)
        previous = reply
    assert renderer.appends > appends  # turns 2 and 3 appended instead of re-tokenizing
    assert not renderer._unsafe


def test_turn_two_reuses_turn_one_prompt_and_output(engine):
    first = engine.respond("Turn-two reuse. " + STORY, params=GREEDY)
    second = engine.respond("Go on.", previous=first.id, params=GREEDY)
    assert first.num_cached_tokens < len(first.prompt_token_ids)
    assert second.num_cached_tokens >= len(first.prompt_token_ids) // BLOCK * BLOCK
    # Cached through turn 1's output as far as its re-rendering agrees with what ran.
    ran = first.prompt_token_ids + first.token_ids[:-1]  # the last token's KV is never computed
    shared = _common_prefix(second.prompt_token_ids, ran)
    assert second.num_cached_tokens >= shared // BLOCK * BLOCK
    assert second.num_input_tokens == len(second.prompt_token_ids)
    assert second.total_tokens == second.num_input_tokens + second.num_output_tokens


def test_same_output_as_chat_with_the_whole_conversation(engine):
    first = engine.respond(STORY, params=GREEDY)
    second = engine.respond("Why?", previous=first, params=GREEDY)
    conversation = [
        {"role": "user", "content": STORY},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Why?"},
    ]
    assert engine.chat(conversation, GREEDY)[0].token_ids == second.token_ids


def test_new_instructions_replace_the_old_ones(engine):
    first = engine.respond(STORY, instructions="Be terse.", params=GREEDY)
    second = engine.respond("More.", first, instructions="Be verbose.", params=GREEDY)
    messages = [
        {"role": "system", "content": "Be verbose."},
        {"role": "user", "content": STORY},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "More."},
    ]
    assert second.prompt_token_ids == _whole(engine, messages, True)


def test_unknown_or_other_salt_previous_id_is_a_value_error(engine):
    first = engine.respond("Salted. " + STORY, params=GREEDY, salt="tenant-a")
    with pytest.raises(ValueError, match="not found"):
        engine.respond("Next?", previous=first.id, params=GREEDY, salt="tenant-b")
    with pytest.raises(ValueError, match="not found"):
        engine.respond("Next?", previous="resp_" + "0" * 32, params=GREEDY)
    assert engine.respond("Next?", previous=first.id, params=GREEDY, salt="tenant-a").text


def test_bad_input_is_a_value_error(engine):
    with pytest.raises(ValueError):
        engine.respond("", params=GREEDY)
    with pytest.raises(ValueError):
        engine.respond([{"role": "wizard", "content": "hi"}], params=GREEDY)


def test_extend_falls_back_to_a_whole_encode_where_the_cut_is_unsafe(engine):
    renderer = engine.responses.renderer
    base = "<|im_start|>user\nhello"
    ids = engine.tokenizer.encode(base, add_special_tokens=False)
    whole = base + " world"  # the tail starts with plain text: tokens may span the cut
    before = renderer.full_renders
    expected = engine.tokenizer.encode(whole, add_special_tokens=False)
    assert renderer.extend(base, ids, whole).tolist() == expected
    assert renderer.full_renders == before + 1
    assert renderer.extend("something else", ids, whole).tolist() == expected


# ------------------------------------------------------------------- the store


def _entry(rid: str, tokens: int, scope: str = "") -> StoredResponse:
    return StoredResponse(
        id=rid,
        scope=scope,
        created_at=0.0,
        messages=[{"role": "user", "content": "hi"}],
        text="hi",
        tokens=np.arange(tokens, dtype=np.int32).tobytes(),
        output_text="hello",
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_evicts_least_recently_used_by_entries_and_tokens():
    store = ResponseStore(max_entries=3, max_tokens=100, clock=FakeClock())
    for i in range(3):
        store.put(_entry(f"r{i}", 10))
    assert store.get("r0", "") is not None  # r1 is now the least recently used
    store.put(_entry("r3", 10))
    assert store.get("r1", "") is None and len(store) == 3
    store.put(_entry("big", 85))
    assert store.num_tokens <= 100 and store.get("big", "") is not None
    assert not store.put(_entry("huge", 101))
    for i in range(50):
        store.put(_entry(f"many{i}", 7))
        assert len(store) <= 3 and store.num_tokens <= 100


def test_store_scopes_and_expires_entries():
    clock = FakeClock()
    store = ResponseStore(ttl_s=60, clock=clock)
    store.put(_entry("a", 5, scope="tenant-a"))
    assert store.get("a", "tenant-b") is None
    assert not store.delete("a", "tenant-b")
    assert store.get("a", "tenant-a") is not None
    clock.now = 61
    assert store.get("a", "tenant-a") is None and len(store) == 0


def test_store_delete_forgets_an_entry():
    store = ResponseStore(clock=FakeClock())
    store.put(_entry("a", 5))
    assert store.delete("a", "")
    assert store.get("a", "") is None and not store.delete("a", "")


def test_store_folder_survives_a_restart_and_continues_a_conversation(engine, tmp_path):
    first = engine.respond("Persisted. " + STORY, params=GREEDY)
    ResponseStore(folder=tmp_path).put(first.stored)
    reloaded = ResponseStore(folder=tmp_path).get(first.id, "")
    assert reloaded == first.stored
    again = engine.respond("Continue.", previous=reloaded, params=GREEDY)
    direct = engine.respond("Continue.", previous=first, params=GREEDY)
    assert again.prompt_token_ids == direct.prompt_token_ids
    store = ResponseStore(folder=tmp_path)
    assert store.delete(first.id, "")
    assert len(ResponseStore(folder=tmp_path)) == 0
