"""Continued turns render only their new messages, and still give the exact token ids."""

from __future__ import annotations

import random
import zlib

import pytest

from chunking.template_shape import content_is_opaque
from prefixcache import Engine
from prefixcache.apps.conversations import ConversationRenderer, stored_response

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRIMMED = CHATML.replace("message['content']", "message['content'] | trim")
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}"
    "{% endif %}" + CHATML
)
# Drops earlier assistant replies' reasoning: the history's text depends on its contents.
REASONING = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content and not loop.last %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
WORDS = ["cache", "prefix", "  spaced ", "\n", "naïve", "über", "tokens", "</think>", "end."]


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine.from_pretrained(str(tiny_llama), device="cpu", kv_cache_tokens=1024)


@pytest.fixture
def with_template(engine):
    original = engine.tokenizer.chat_template

    def use(template: str) -> ConversationRenderer:
        engine.tokenizer.chat_template = template
        return ConversationRenderer(engine.inputs)

    yield use
    engine.tokenizer.chat_template = original


def _whole(engine: Engine, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return engine.tokenizer.encode(text, add_special_tokens=False)


def _text(rng: random.Random, longest: int) -> str:
    count = rng.randint(1, longest)
    return "".join(rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(count))


def _converse(engine, renderer, rng, turns: int, instructions: str | None) -> None:
    """Run ``turns`` turns with random replies; every prompt and stored id list is exact."""
    previous, messages = None, []
    for k in range(turns):
        new = [{"role": "user", "content": _text(rng, 40 if k == 0 else 6)}]
        turn = renderer.turn(new, previous, instructions)
        messages += new
        system = [{"role": "system", "content": instructions}] if instructions else []
        assert turn.prompt_ids.tolist() == _whole(engine, system + messages, True)
        reply = _text(rng, 6)
        previous = stored_response(renderer, turn, f"r{k}", "", reply, (0, 0, 0), "stop")
        messages.append({"role": "assistant", "content": reply})
        assert previous.token_ids.tolist() == _whole(engine, system + messages, False)


@pytest.mark.parametrize("template", [CHATML, TRIMMED, DEFAULT_SYSTEM, REASONING, LLAMA3])
@pytest.mark.parametrize("instructions", [None, "Answer briefly."])
def test_continued_turns_equal_rendering_the_whole_conversation(
    engine, with_template, template, instructions
):
    renderer = with_template(template)
    rng = random.Random(zlib.crc32(f"{template}{instructions}".encode()))
    for _ in range(6):
        _converse(engine, renderer, rng, rng.randint(1, 4), instructions)
    assert not renderer._unsafe


@pytest.mark.parametrize("template", [CHATML, TRIMMED, DEFAULT_SYSTEM])
def test_an_opaque_template_never_renders_the_history_again(engine, with_template, template):
    renderer = with_template(template)
    rendered = []
    render = renderer._render
    renderer._render = lambda messages, add: rendered.append(messages) or render(messages, add)
    history = "a very long history " * 500
    turn = renderer.turn([{"role": "user", "content": history}], None, None)
    previous = stored_response(renderer, turn, "r0", "", "a reply", (0, 0, 0), "stop")
    rendered.clear()
    renderer._verified = True  # past the one-time whole-encode check
    full_renders = renderer.full_renders
    turn = renderer.turn([{"role": "user", "content": "and then?"}], previous, None)
    stored_response(renderer, turn, "r1", "", "the end", (0, 0, 0), "stop")
    assert rendered and all(m["content"] != history for ms in rendered for m in ms)
    assert renderer.full_renders == full_renders
    messages = previous.messages + [{"role": "user", "content": "and then?"}]
    assert turn.prompt_ids.tolist() == _whole(engine, messages, True)


def test_a_content_dependent_template_renders_the_whole_conversation(engine, with_template):
    renderer = with_template(REASONING)
    turn = renderer.turn([{"role": "user", "content": "hi"}], None, None)
    reply = "<think>hidden</think>shown"
    previous = stored_response(renderer, turn, "r0", "", reply, (0, 0, 0), "stop")
    turn = renderer.turn([{"role": "user", "content": "more"}], previous, None)
    assert turn.base_text is not None  # the history was rendered: its text changed
    messages = previous.messages + [{"role": "user", "content": "more"}]
    assert turn.prompt_ids.tolist() == _whole(engine, messages, True)


@pytest.mark.parametrize("template", [CHATML, TRIMMED, DEFAULT_SYSTEM, LLAMA3])
def test_templates_that_only_print_contents_are_opaque(template):
    assert content_is_opaque(template)


@pytest.mark.parametrize(
    "body",
    [
        "{% if '</think>' in m.content %}x{% endif %}{{ m.content }}",
        "{{ m.content | length }}",
        "{{ m | tojson }}",
        "{% if m.content %}{{ m.content }}{% endif %}",
        "{{ m.content.strip() }}",
        "{{ m.content | upper }}",
        "{% for k in ['role', 'content'] %}{{ m[k] }}{% endfor %}",
        "{% set c = m.content %}{% if c == 'x' %}y{% endif %}",
        "{% filter upper %}{{ m.content }}{% endfilter %}",
        "{{ loop.previtem }}",
        "{% set ns.text = m.content %}",
    ],
)
def test_templates_that_look_into_contents_are_not_opaque(body):
    template = "{% set ns = namespace(text='') %}{% for m in messages %}" + body + "{% endfor %}"
    assert not content_is_opaque(template)
    assert not content_is_opaque("{{ messages | tojson }}")
    assert not content_is_opaque("{% for m in messages %}")  # a syntax error
    assert not content_is_opaque(None)
