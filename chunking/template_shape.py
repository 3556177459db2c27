"""Chat templates whose output depends on message contents only as printed text.

Such a template is *content-opaque*: every message's content reaches the output
only as text (possibly through ``trim``), and is otherwise only tested for its
type. What it renders around the contents (headers, separators, a default system
prompt) then depends on roles, positions and counts alone, so a conversation can
be rendered with short stand-ins for its long contents and the result cut and
compared exactly as the real rendering would be. ``content_is_opaque`` decides it
from the template's syntax tree and answers False whenever it is unsure: a
content used in a condition, a comparison, a method call, a length, or a whole
message handed to a filter such as ``tojson``.
"""

from __future__ import annotations

import uuid

import jinja2
from jinja2 import nodes

_ENV = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
_TYPE_TESTS = frozenset({"string", "defined", "undefined", "none", "mapping", "sequence"})
_TEXT_FILTERS = frozenset({"trim", "string", "safe"})
_LIST_FILTERS = frozenset({"reverse", "list"})
_LIST, _MESSAGE, _CONTENT = "list", "message", "content"


# What stands in for message contents: a process-wide random tag no template writes.
STAND_IN = f"<<{uuid.uuid4().hex}:{{}}>>"
STAND_IN_MARK = STAND_IN.partition("{")[0]


def with_stand_ins(messages) -> list[dict]:
    """``messages`` with each content replaced by its numbered stand-in."""
    return [{"role": m["role"], "content": STAND_IN.format(i)} for i, m in enumerate(messages)]


def content_is_opaque(source: object) -> bool:
    """True when the template source provably treats message contents as opaque text."""
    if not isinstance(source, str):
        return False
    try:
        tree = _ENV.parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    if any(True for _ in tree.find_all((nodes.AssignBlock, nodes.FilterBlock))):
        return False  # text captured or filtered as a block: contents may be rewritten
    parents = _parents(tree)
    kinds = _name_kinds(tree)
    for name in tree.find_all(nodes.Name):
        if name.ctx == "load" and name.name in kinds and not _use_is_safe(name, parents, kinds):
            return False
    return not any(_is_neighbour(n) for n in tree.find_all(nodes.Getattr))


def _is_neighbour(node: nodes.Getattr) -> bool:
    """``loop.previtem``/``loop.nextitem``: a whole message reached around the tracking."""
    looped = isinstance(node.node, nodes.Name) and node.node.name == "loop"
    return looped and node.attr in ("previtem", "nextitem")


def _parents(tree: nodes.Node) -> dict[int, tuple[nodes.Node, str]]:
    """Each node's parent and the field of the parent that holds it."""
    found: dict[int, tuple[nodes.Node, str]] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        for field in node.fields:
            value = getattr(node, field)
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, nodes.Node):
                    found[id(child)] = (node, field)
                    stack.append(child)
    return found


def _name_kinds(tree: nodes.Template) -> dict[str, str]:
    """Names holding the message list, one message, or a content (or text built from one)."""
    kinds = {"messages": _LIST}
    changed = True
    while changed:
        changed = False
        for node in tree.find_all((nodes.For, nodes.Assign)):
            value = node.iter if isinstance(node, nodes.For) else node.node
            kind = _kind(value, kinds)
            if isinstance(node, nodes.For):
                kind = _MESSAGE if kind == _LIST else None
            target = node.target
            if kind and isinstance(target, nodes.Name) and kinds.get(target.name) != kind:
                kinds[target.name] = kind
                changed = True
    return kinds


def _kind(node: nodes.Node, kinds: dict[str, str]) -> str | None:
    """What an expression holds: the list, a message, a content, or nothing tracked."""
    if isinstance(node, nodes.Name):
        return kinds.get(node.name)
    if isinstance(node, nodes.Getitem | nodes.Getattr | nodes.Filter):
        return _lifted(_kind(node.node, kinds), node, "node")
    if isinstance(node, nodes.Add | nodes.Concat | nodes.CondExpr):
        children = node.nodes if isinstance(node, nodes.Concat) else _operands(node)
        return _CONTENT if any(_kind(c, kinds) == _CONTENT for c in children) else None
    return None


def _operands(node: nodes.Add | nodes.CondExpr) -> list[nodes.Node]:
    if isinstance(node, nodes.Add):
        return [node.left, node.right]
    return [n for n in (node.expr1, node.expr2) if n is not None]


def _lifted(kind: str | None, parent: nodes.Node, field: str) -> str | None:
    """The kind of ``parent`` given that its ``field`` holds a value of ``kind``."""
    if kind is None or field != "node":
        return None
    if isinstance(parent, nodes.Filter):
        if kind == _CONTENT and parent.name in _TEXT_FILTERS:
            return _CONTENT
        return _LIST if kind == _LIST and parent.name in _LIST_FILTERS else None
    if isinstance(parent, nodes.Getitem | nodes.Getattr):
        key = _key(parent)
        if kind == _LIST:
            return _LIST if isinstance(key, nodes.Slice) else _MESSAGE
        if kind == _MESSAGE and key == "content":
            return _CONTENT
    return None


def _key(node: nodes.Getitem | nodes.Getattr):
    if isinstance(node, nodes.Getattr):
        return node.attr
    return node.arg.value if isinstance(node.arg, nodes.Const) else node.arg


def _use_is_safe(name: nodes.Name, parents: dict, kinds: dict[str, str]) -> bool:
    """Follow one use of a tracked name up to where its value ends up, and judge that."""
    node, kind = name, kinds[name.name]
    while True:
        parent, field = parents[id(node)]
        lifted = _carried(kind, parent, field)
        if lifted is None:
            return _ends_safely(kind, parent, field)
        node, kind = parent, lifted


def _carried(kind: str, parent: nodes.Node, field: str) -> str | None:
    """The value's kind one level up, when the parent still just carries it."""
    if isinstance(parent, nodes.Add | nodes.Concat) and kind == _CONTENT:
        return _CONTENT
    if isinstance(parent, nodes.CondExpr) and field in ("expr1", "expr2"):
        return kind
    return _lifted(kind, parent, field)


def _ends_safely(kind: str, parent: nodes.Node, field: str) -> bool:
    """Where a value may end: printed or aliased (contents), looped over or counted
    (the list), read for another key (a message), or type-tested (any)."""
    if isinstance(parent, nodes.Test):
        return field == "node" and parent.name in _TYPE_TESTS
    if isinstance(parent, nodes.Assign):  # an alias, whose own uses are checked
        return field == "node" and isinstance(parent.target, nodes.Name)
    if kind == _CONTENT:
        return isinstance(parent, nodes.Output)
    if kind == _LIST:
        if isinstance(parent, nodes.Filter):
            return field == "node" and parent.name == "length"
        return isinstance(parent, nodes.For) and field == "iter"
    readable = isinstance(parent, nodes.Getitem | nodes.Getattr) and field == "node"
    return readable and isinstance(_key(parent), str)
