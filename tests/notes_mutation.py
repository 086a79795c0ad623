"""A pytest plugin for the notes index's mutation check (`tests/test_notes_index.py`): it runs each
row's test with the row's function perturbed, so that the check can see whether the test notices.

Loaded with `-p notes_mutation` (tests/ on PYTHONPATH) and the environment variable
NOTES_MUTANTS=FILE, a JSON list of {"test": "tests/test_x.py::test_name", "code": "file.py:name",
"kind": "scale" | "flip"}. Each listed test is then collected once per mutant that names it (and
once per parametrisation), never plain, and the outcome of each run goes to the JSON file
NOTES_MUTANTS_REPORT: {node id: "caught" (an AssertionError), "passed" (the mutant survived) or
"error: Type" (any other exception)}.

The perturbation ("the row's function, its output scaled by 1.01, or its sign flipped"):
  - a function: its output, recursively through tuples, lists and dicts: a float or a float tensor
    or array is multiplied by 1.01 ("scale") or by −1 ("flip"), a bool (tensor, array) is negated,
    ints and everything else stay; an nn.Module that it returns gets the same done to its outputs;
  - a class: the outputs of its instances' `forward` (an nn.Module) or of the methods in
    CLASS_METHODS below;
  - `update_target`, which returns nothing: the target network's weights after the update;
  - `epsilon_greedy`, which returns an action (an int): the sign of Q(s, ·) that it reads, so that
    it exploits argmin_a Q instead of argmax_a Q.
The function is replaced in its module and wherever a module of this repository bound it by name
(`from ppo import gae` in a test), so both the code that calls it and the test see the mutant.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASS_METHODS = {"Maze": ["step"], "ReplayBuffer": ["sample"]}  # a class that is not an nn.Module


def _mutants() -> list[dict]:
    path = os.environ.get("NOTES_MUTANTS")
    return json.loads(Path(path).read_text()) if path else []


def perturb(x, kind: str):
    """x with every float ×1.01 (kind "scale") or ×(−1) ("flip"), every bool negated."""
    factor = 1.01 if kind == "scale" else -1.0
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool:
            return ~x
        return x * factor if x.is_floating_point() else x
    if isinstance(x, np.ndarray):
        if x.dtype == bool:
            return ~x
        return x * factor if np.issubdtype(x.dtype, np.floating) else x
    if isinstance(x, (bool, np.bool_)):
        return not x
    if isinstance(x, (float, np.floating)):
        return type(x)(x * factor)
    if isinstance(x, tuple):
        return type(x)(*(perturb(v, kind) for v in x)) if hasattr(x, "_fields") else tuple(perturb(v, kind) for v in x)
    if isinstance(x, list):
        return [perturb(v, kind) for v in x]
    if isinstance(x, dict):
        return {k: perturb(v, kind) for k, v in x.items()}
    if isinstance(x, torch.nn.Module):
        x.register_forward_hook(lambda module, inputs, out: perturb(out, kind))
    return x


def mutate_function(fn, kind: str):
    if fn.__name__ == "update_target":  # θ' ← τθ + (1 − τ)θ', then θ' ×1.01 (or −θ')
        @functools.wraps(fn)
        def mutant(target, online, tau):
            fn(target, online, tau)
            with torch.no_grad():
                for p in target.parameters():
                    p.copy_(perturb(p, kind))
        return mutant

    if fn.__name__ == "epsilon_greedy":  # the sign of Q flipped
        @functools.wraps(fn)
        def mutant(q_s, eps, rng):
            return fn(-q_s, eps, rng)
        return mutant

    @functools.wraps(fn)
    def mutant(*args, **kwargs):
        return perturb(fn(*args, **kwargs), kind)
    return mutant


def mutate_class(cls, kind: str):
    methods = CLASS_METHODS.get(cls.__name__, [])
    body = {m: mutate_function(getattr(cls, m), kind) for m in methods}
    if issubclass(cls, torch.nn.Module):
        def __init__(self, *args, **kwargs):
            cls.__init__(self, *args, **kwargs)
            self.register_forward_hook(lambda module, inputs, out: perturb(out, kind))
        body["__init__"] = __init__
    assert body, f"no perturbation is defined for the class {cls.__name__}: add it to CLASS_METHODS"
    return type(cls.__name__, (cls,), body)


def module_of(file: str):
    """`ppo.py` -> the module ppo; `models/build.py` -> models.build."""
    return importlib.import_module(file[:-3].replace("/", "."))


@pytest.fixture(autouse=True)
def notes_mutant_applied(request, monkeypatch):
    """Puts the mutant of this run (its parametrisation `notes_mutant`) in place, for the test only."""
    callspec = getattr(request.node, "callspec", None)
    m = callspec.params.get("notes_mutant") if callspec else None
    if m is None:
        yield None
        return
    file, name = m["code"].split(":")
    module = module_of(file)
    owner, _, method = name.rpartition(".")
    if owner:  # `Class.method`: the method's output, in the class itself
        cls = getattr(module, owner)
        monkeypatch.setattr(cls, method, mutate_function(getattr(cls, method), m["kind"]))
        yield m
        return
    original = getattr(module, name)
    mutant = (mutate_class if isinstance(original, type) else mutate_function)(original, m["kind"])
    for mod in list(sys.modules.values()):  # every binding of the original in this repository's modules
        path = getattr(mod, "__file__", None) or ""
        if path.startswith(str(ROOT) + os.sep):
            for key, value in list(vars(mod).items()):
                if value is original:
                    monkeypatch.setattr(mod, key, mutant)
    yield m


def pytest_generate_tests(metafunc):
    path = Path(metafunc.definition.fspath).relative_to(ROOT).as_posix()
    mine = [m for m in _mutants() if m["test"] == f"{path}::{metafunc.function.__name__}"]
    if mine:
        metafunc.fixturenames.append("notes_mutant")
        metafunc.parametrize("notes_mutant", mine,
                             ids=[f"{m['code']}*{m['kind']}" for m in mine])


_report: dict[str, str] = {}


def pytest_runtest_makereport(item, call):
    if call.when == "call":
        if call.excinfo is None:
            _report[item.nodeid] = "passed"
        elif call.excinfo.errisinstance(AssertionError):
            _report[item.nodeid] = "caught"
        else:
            _report[item.nodeid] = f"error: {call.excinfo.typename}: {str(call.excinfo.value)[:200]}"


def pytest_sessionfinish(session):
    path = os.environ.get("NOTES_MUTANTS_REPORT")
    if path:
        Path(path).write_text(json.dumps(_report, indent=1))
