"""Function tools: parsing tool calls out of a model's own format (one parser per
family, chosen from the chat template) and the grammar that forces a valid call."""

from prefixcache.tools import hermes, llama3  # noqa: F401  (registers the parsers)
from prefixcache.tools.calls import CallEvent, ContentEvent, ParsedReply, ToolCall
from prefixcache.tools.parsers import (
    ToolCallParser,
    parser_for_template,
    parser_named,
    register_parser,
)

__all__ = [
    "CallEvent",
    "ContentEvent",
    "ParsedReply",
    "ToolCall",
    "ToolCallParser",
    "parser_for_template",
    "parser_named",
    "register_parser",
]
