"""Sizes a reader can hold in their head: no file over 400 lines and no function body over 60 lines in the
library, the stages and the CLI (a typer command's option list is its signature, so it is not counted)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("minisora", "stages", "cli")
MAX_FILE_LINES, MAX_BODY_LINES = 400, 60


def long_functions(source: str, limit: int = MAX_BODY_LINES) -> list[tuple[str, int]]:
    """(name, body lines) of every function whose body, docstring included, runs over `limit` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.body[0].lineno + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def _files():
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_rule_sees_a_long_body_but_not_a_long_signature():
    signature = "def f(\n" + "".join(f"    a{i}: int = 0,\n" for i in range(80)) + "):\n    return 1\n"
    body = "def g():\n" + "".join(f"    x{i} = {i}\n" for i in range(61))
    assert long_functions(signature) == []
    assert long_functions(body) == [("g", 61)]


def test_no_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _files() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_function_body_over_60_lines():
    long = {f"{p.relative_to(ROOT)}:{name}": n for p in _files() for name, n in long_functions(p.read_text())}
    assert long == {}
