"""Chat templates of the tiny test models: plain ChatML, and two with function tools.

``hermes`` is Qwen 2.5's layout: the tools as JSON lines inside ``<tools>`` in the
system message, calls as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``,
tool results as user turns in ``<tool_response>``. ``llama3`` is Llama 3.1's: header
tokens around each role, the tools as indented JSON in the system message, a call as
a bare ``{"name": ..., "parameters": ...}`` object, results in ``ipython`` turns.
Both are written here from those models' published templates, so no test downloads
a tokenizer.
"""

from __future__ import annotations

from typing import NamedTuple

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
LLAMA_BOS, LLAMA_HEADER_START, LLAMA_HEADER_END, LLAMA_EOT = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A call's arguments come as a JSON string (OpenAI) or an object (already parsed).
_CALL_ARGUMENTS = (
    "{%- if tc.arguments is string %}{{- tc.arguments }}"
    "{%- else %}{{- tc.arguments | tojson }}{%- endif %}"
)

HERMES_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user '
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML "
    'tags:\\n<tools>" }}'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function '
    "name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
    '<|im_end|>\\n" }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content "
    "+ '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- set tc = tool_call.function if tool_call.function is defined else tool_call %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tc.name + \'", "arguments": \' }}'
    + _CALL_ARGUMENTS
    + "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if tools or system_message %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- system_message }}"
    "{%- if tools %}"
    "{{- '\\n\\nYou have access to the following functions. To call a function, respond "
    'with a JSON object of the form {"name": function name, "parameters": dictionary of '
    "argument name and its value}. Do not use variables.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- set tc = tool_call.function if tool_call.function is defined else tool_call %}"
    "{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    '{{- \'{"name": "\' + tc.name + \'", "parameters": \' }}' + _CALL_ARGUMENTS + "{{- '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content "
    "+ '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


class ChatStyle(NamedTuple):
    """A tiny model's chat template and the tokens it needs beyond the trained vocabulary."""

    template: str
    bos: str
    eos: str
    special_tokens: tuple[str, ...] = ()  # added as special tokens (split out, skipped)
    added_tokens: tuple[str, ...] = ()  # added as plain tokens (split out, kept in text)


CHAT_STYLES: dict[str, ChatStyle] = {
    "chatml": ChatStyle(CHATML_TEMPLATE, ENDOFTEXT, IM_END),
    "hermes": ChatStyle(
        HERMES_TEMPLATE, ENDOFTEXT, IM_END, added_tokens=(TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    ),
    "llama3": ChatStyle(
        LLAMA3_TEMPLATE,
        LLAMA_BOS,
        LLAMA_EOT,
        special_tokens=(LLAMA_BOS, LLAMA_HEADER_START, LLAMA_HEADER_END, LLAMA_EOT),
    ),
}
