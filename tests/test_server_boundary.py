"""The server knows an engine only through ``EngineClient``: no reaching into its insides."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"
ALLOWED = {"prefixcache", "prefixcache.client"}  # public names and the client seam


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            # ``from prefixcache import client`` names a module too
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _violations(source: str) -> list[str]:
    tree = ast.parse(source)
    bad = []
    for line, module in _imported_modules(tree):
        root = module.split(".")[0]
        if root != "prefixcache" or module in ALLOWED:
            continue
        parent = module.rsplit(".", 1)[0]
        if parent in ALLOWED and not _is_submodule(module):
            continue  # a name imported from an allowed module, e.g. prefixcache.Engine
        bad.append(f"line {line}: {module}")
    return bad


def _is_submodule(module: str) -> bool:
    """True when ``module`` names a module or package of the library, not an attribute."""
    path = Path(__file__).resolve().parent.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_server_module_imports_engine_internals():
    offenders = {}
    for file in sorted(SERVER.glob("*.py")):
        bad = _violations(file.read_text())
        if bad:
            offenders[file.name] = bad
    assert not offenders, f"server modules reaching past EngineClient: {offenders}"


def test_the_check_catches_an_internal_import():
    assert _violations("from prefixcache.engine.loop import EngineLoop\n")
    assert _violations("import prefixcache.cache.radix_cache\n")
    assert _violations("def f():\n    from prefixcache import sdk\n")
    assert not _violations("from prefixcache import Engine\nfrom prefixcache.client import X\n")
