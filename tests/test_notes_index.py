"""Keeps the README's notes index honest: every function and every test it names must exist, and
each row's test must call the row's function (read from the test's source, not imported).

The index is the table between the lines `<!-- notes-index:start -->` and `<!-- notes-index:end -->`
in README.md. Its code cells hold `file.py:function` (or `file.py:Class.method`), and its test cells
hold `tests/test_x.py::test_name`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def index_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- notes-index:start -->"), text.index("<!-- notes-index:end -->")
    return [line for line in text[start:end].splitlines() if line.startswith("|")][2:]


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes, and `Class.method` for methods, found by parsing (no import)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef))
    return names


def test_the_index_has_rows():
    assert len(index_rows()) >= 10


def test_every_function_and_test_named_in_the_index_exists():
    missing = []
    for row in index_rows():
        for file, name in re.findall(r"`([\w/]+\.py):(?!:)([\w.]+)`", row):
            if name not in defined_names(ROOT / file):
                missing.append(f"{file}:{name}")
        for file, name in re.findall(r"`(tests/[\w]+\.py)::(\w+)`", row):
            if name not in defined_names(ROOT / file):
                missing.append(f"{file}::{name}")
    assert not missing, f"the README's notes index names what does not exist: {missing}"


def test_every_row_names_code_and_a_test():
    for row in index_rows():
        assert re.search(r"`[\w/]+\.py:[\w.]+`", row), f"no code named in: {row}"
        assert re.search(r"`tests/\w+\.py::\w+`", row), f"no test named in: {row}"


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def _direct_calls(fn: ast.FunctionDef) -> set[str]:
    """`f(...)`, `module.f(...)` and `obj.f(...)` all give `f`."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def called_names(test_file: Path, test: str) -> set[str]:
    """Every name the test calls, in its own body or in a helper of the same test file that it calls
    (followed to any depth): a test that checks a loss through a small `one_token(...)` helper
    still calls the loss."""
    functions, seen, todo, calls = _functions(test_file), set(), [test], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        direct = _direct_calls(functions[name])
        calls |= direct
        todo += [n for n in direct if n in functions]
    return calls


def test_every_rows_test_calls_the_function_the_row_names():
    """A row counts as checked only if its test really calls the row's function (or, for a row that
    names a class, constructs or calls it): both names existing is not enough."""
    wrong = []
    for row in index_rows():
        code = [name.split(".")[-1] for _, name in re.findall(r"`([\w/]+\.py):(?!:)([\w.]+)`", row)]
        for file, test in re.findall(r"`(tests/[\w]+\.py)::(\w+)`", row):
            if not set(code) & called_names(ROOT / file, test):
                wrong.append(f"{test} calls none of {', '.join(code)}")
    assert not wrong, "notes-index rows whose test does not call their function:\n" + "\n".join(wrong)
