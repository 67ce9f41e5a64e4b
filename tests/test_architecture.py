"""Imports go one way: server.api → server.engine → models; server.api → experts.

`models` and `server.engine` never import FastAPI, pydantic or the HTTP layer; `models` never imports `server`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "models": {"server", "experts", "fastapi", "pydantic", "pydantic_settings", "starlette", "uvicorn"},
    "server/engine": {"server.api", "server.app", "server.settings", "experts", "fastapi", "pydantic",
                      "pydantic_settings", "starlette", "uvicorn"},
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_one_way_imports(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            bad = [f for f in FORBIDDEN[package] if name == f or name.startswith(f + ".")]
            assert not bad, f"{path.relative_to(ROOT)} imports {name}"
