"""Segment-wise chat tokenization equals tokenizing the whole rendered prompt."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from chunking.segments import SegmentTokenizer

WORDS = ["cache", "héllo", "中文", "🙂", "token", "  spaced", "\n", "x", "<b>", "end."]


def _conversation(rng: random.Random, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief. " * rng.randint(0, 3)}]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        words = [rng.choice(WORDS) for _ in range(rng.randint(0, 40))]
        messages.append({"role": role, "content": " ".join(words)})
    return messages


def _whole(tokenizer, messages, add_generation_prompt=True) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer.encode(text, add_special_tokens=False)


def test_segmented_ids_equal_whole_text_ids(tiny_model_factory):
    for arch in ("llama", "qwen2"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory(arch))
        segments = SegmentTokenizer(tokenizer)
        rng = random.Random(0)
        for _ in range(40):
            messages = _conversation(rng, rng.randint(1, 6))
            for add in (True, False):
                ids = segments.encode_chat(messages, add).tolist()
                assert ids == _whole(tokenizer, messages, add)
        assert segments.fallbacks == 0 and segments.hits > 0


def test_a_new_turn_tokenizes_only_its_new_messages(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    segments = SegmentTokenizer(tokenizer)
    history = _conversation(random.Random(1), 4)
    segments.encode_chat(history)
    misses = segments.misses
    longer = history + [{"role": "user", "content": "and now?"}]
    assert segments.encode_chat(longer).tolist() == _whole(tokenizer, longer)
    assert segments.misses - misses == 1  # only the new message; the rest is cached


def test_template_without_special_cuts_falls_back_to_whole_text(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    segments = SegmentTokenizer(tokenizer)
    messages = _conversation(random.Random(2), 3)
    assert segments.encode_chat(messages).tolist() == _whole(tokenizer, messages)
    assert segments.fallbacks == 1


SPECIAL_WORDS = ["<|im_end|>", "<|im_start|>", "  edge ", "\n\n", "ok"]
TEMPLATES = {
    "chatml": None,  # the tiny tokenizer's own
    "trimmed": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim"
        " + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "default system": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nHi.<|im_end|>\\n' }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content']"
        " + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "looks into contents": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['content'] %}{{ m['content'] }}{% else %}(empty){% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def test_long_conversations_with_special_text_in_contents_stay_exact(tiny_llama):
    rng = random.Random(3)
    for name, template in TEMPLATES.items():
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        tokenizer.chat_template = template or tokenizer.chat_template
        segments = SegmentTokenizer(tokenizer)
        for _ in range(10):
            messages = _conversation(rng, rng.randint(1, 30))
            for message in messages[1:]:
                extra = rng.choices(SPECIAL_WORDS + WORDS, k=rng.randint(0, 4))
                message["content"] = " ".join(extra) + message["content"]
            for add in (True, False):
                ids = segments.encode_chat(messages, add).tolist()
                assert ids == _whole(tokenizer, messages, add), name


def test_an_opaque_template_renders_a_long_conversation_a_fixed_number_of_times(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    segments = SegmentTokenizer(tokenizer)
    calls = []
    render = segments.render
    segments.render = lambda messages, add: calls.append(len(messages)) or render(messages, add)
    messages = _conversation(random.Random(4), 80)
    assert segments.encode_chat(messages).tolist() == _whole(tokenizer, messages)
    assert len(calls) == 2  # the conversation once, and once with stand-in contents
