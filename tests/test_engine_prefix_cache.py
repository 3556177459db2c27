"""The engine reuses cached prefixes, and output with the cache equals output without it."""

from __future__ import annotations

import random

from prefixcache import Engine, SamplingParams

BLOCK = 16


def _engine(folder, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return Engine.from_pretrained(str(folder), device="cpu", dtype="float32", **kwargs)


def _turn(engine, history, question, max_tokens=16, salt=None):
    messages = history + [{"role": "user", "content": question}]
    out = engine.chat(messages, SamplingParams(max_tokens=max_tokens), salt=salt)[0]
    return out, messages + [{"role": "assistant", "content": out.text}]


def test_turn_two_reuses_turn_one_prompt_and_output(tiny_llama):
    engine = _engine(tiny_llama)
    first, history = _turn(engine, [], "Tell me a long story about caches. " * 8)
    second, _ = _turn(engine, history, "And then?")
    turn_one_tokens = len(first.prompt_token_ids) + len(first.token_ids)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= (turn_one_tokens // BLOCK) * BLOCK - BLOCK
    stats = engine.stats()
    assert stats["hit_tokens"] >= second.num_cached_tokens
    engine.check_integrity()


def test_disabled_cache_never_hits(tiny_llama):
    engine = _engine(tiny_llama, enable_prefix_caching=False)
    _, history = _turn(engine, [], "Some context here. " * 10)
    second, _ = _turn(engine, history, "More?")
    assert second.num_cached_tokens == 0
    engine.check_integrity()


def test_other_salt_does_not_hit(tiny_llama):
    engine = _engine(tiny_llama)
    prompt = [7] * 100
    engine.generate(prompt, SamplingParams(max_tokens=2), salt="tenant-a")
    same = engine.generate(prompt, SamplingParams(max_tokens=2), salt="tenant-a")[0]
    other = engine.generate(prompt, SamplingParams(max_tokens=2), salt="tenant-b")[0]
    assert same.num_cached_tokens == 96 and other.num_cached_tokens == 0


def test_at_least_one_token_is_recomputed(tiny_llama):
    engine = _engine(tiny_llama)
    prompt = list(range(3, 3 + 64))  # exactly four blocks
    first = engine.generate(prompt, SamplingParams(max_tokens=3))[0]
    again = engine.generate(prompt, SamplingParams(max_tokens=3))[0]
    assert again.num_cached_tokens == 48 and again.token_ids == first.token_ids


def _conversations(seed: int, count: int) -> list[list[str]]:
    rng = random.Random(seed)
    words = ["cache", "prefix", "token", "block", "radix", "tree", "turn", "reply", "héllo"]
    shared = " ".join(rng.choice(words) for _ in range(40))
    convs = []
    for _ in range(count):
        base = shared if rng.random() < 0.5 else ""
        turns = [base + " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))]
        turns += [
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            for _ in range(rng.randint(1, 3))
        ]
        convs.append(turns)
    return convs


def _play(engine, conversations):
    transcripts = []
    for turns in conversations:
        history, outputs = [], []
        for question in turns:
            out, history = _turn(engine, history, question, max_tokens=12)
            outputs.append(out.token_ids)
        transcripts.append(outputs)
    return transcripts


def test_fifty_conversations_with_eviction_equal_cache_off(tiny_llama):
    conversations = _conversations(seed=3, count=50)
    on = _engine(tiny_llama, kv_cache_tokens=1024)
    off = _engine(tiny_llama, kv_cache_tokens=1024, enable_prefix_caching=False)
    assert _play(on, conversations) == _play(off, conversations)
    stats = on.stats()
    assert stats["hit_tokens"] > 0 and stats["evicted_blocks"] > 0
    assert on.core.blocks.cache.num_locked_blocks == 0
    on.check_integrity()


def test_a_conversation_extended_turn_by_turn_stays_one_tree_node(tiny_llama):
    engine = _engine(tiny_llama)
    rng, ids = random.Random(4), []
    for _ in range(6):
        ids += [rng.randrange(3, 700) for _ in range(70)]
        ids += engine.generate(ids, SamplingParams(max_tokens=9, ignore_eos=True))[0].token_ids
    cache = engine.core.blocks.cache
    match = cache.match(ids)
    depth, node = 0, match.node
    while node.parent is not None:
        depth, node = depth + 1, node.parent
    cache.unlock(match.node)
    assert match.num_tokens == len(ids) // BLOCK * BLOCK
    assert depth == 1 and cache.check_integrity() is None
