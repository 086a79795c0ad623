"""Keeps the README's notes index honest: every function and every test it names must exist, each
row's test must call the row's function (read from the test's source, not imported), and each row's
test must fail when the row's function is perturbed (the mutation check, the last test below).

The index is the table between the lines `<!-- notes-index:start -->` and `<!-- notes-index:end -->`
in README.md. Its code cells hold `file.py:function` (or `file.py:Class.method`), and its test cells
hold `tests/test_x.py::test_name`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
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


def row_mutants() -> list[dict]:
    """One mutant per (test, function) pair of the index: the test, run with the function perturbed."""
    mutants = []
    for row in index_rows():
        codes = re.findall(r"`([\w/]+\.py):(?!:)([\w.]+)`", row)
        for file, test in re.findall(r"`(tests/[\w]+\.py)::(\w+)`", row):
            for code_file, name in codes:
                m = {"test": f"{file}::{test}", "code": f"{code_file}:{name}", "kind": "scale"}
                if m not in mutants:
                    mutants.append(m)
    return mutants


def test_every_rows_test_fails_when_the_rows_function_is_perturbed(tmp_path):
    """The mutation check. Each row's test is run again with the row's function perturbed: its
    output ×1.01 (a bool negated; `tests/notes_mutation.py` says what is perturbed for a class, for
    `update_target` and for `epsilon_greedy`). The test must then fail on an assertion: a test that
    still passes, or that only crashes, does not check the value that the row claims it checks. All
    mutants run in one pytest subprocess (the plugin `notes_mutation`), each test once per mutant and
    parametrisation; a parametrised test fails if any of its cases does."""
    mutants = row_mutants()
    spec, report = tmp_path / "mutants.json", tmp_path / "report.json"
    spec.write_text(json.dumps(mutants))
    path = [str(ROOT / "tests")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, NOTES_MUTANTS=str(spec), NOTES_MUTANTS_REPORT=str(report), PYTHONPATH=os.pathsep.join(path))
    tests = sorted({m["test"] for m in mutants})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "notes_mutation", "-p", "no:cacheprovider",
                          *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), f"the mutation run wrote no report:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    outcomes = json.loads(report.read_text())
    survivors = []
    for m in mutants:
        tag = f"[{m['code']}*{m['kind']}"
        runs = [v for k, v in outcomes.items() if k.split("[")[0] == m["test"] and tag in k]
        if "caught" not in runs:
            survivors.append(f"{m['code']} under {m['test']}: {sorted(set(runs)) or 'not run'}")
    assert not survivors, (f"{len(survivors)} of {len(mutants)} rows' tests survive their function perturbed:\n"
                           + "\n".join(survivors))
