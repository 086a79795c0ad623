"""The layout: three layers, and the imports show which is which.

    the algorithms  dqn_maze.py reinforce.py grpo.py dpo.py reward_model.py ppo.py   (read these)
                        │  each imports only the layers below, never another algorithm
                        ▼
    the harness     harness.py (command line, run folder, logging, checkpoints, precision)   (skip)
    the tasks       tasks.py (the built-in tasks, their rewards, users' data, reward models on disk)
                        │
                        ▼
    the core        common.py (masked statistics, padding, log-probs, generation, model loading)

Checked by parsing the imports (no import runs), and by copying one algorithm file with the three
lower modules into an empty folder, as a user who copies it into another project would.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("dqn_maze", "reinforce", "grpo", "dpo", "reward_model", "ppo")
LAYERS = {"harness": {"common"}, "tasks": {"common"}, "common": set()}  # what each lower module may import


def project_imports(name: str) -> set[str]:
    """The modules of this project that `name`.py imports, anywhere in the file."""
    local = set(ALGORITHMS) | set(LAYERS)
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & local


def test_no_algorithm_imports_another_and_the_arrows_only_point_down():
    for name in ALGORITHMS:
        assert project_imports(name) <= set(LAYERS), f"{name}.py imports {project_imports(name) - set(LAYERS)}"
    for name, allowed in LAYERS.items():
        assert project_imports(name) <= allowed, f"{name}.py imports {project_imports(name) - allowed}"


def test_common_is_the_small_core():
    assert len((ROOT / "common.py").read_text().splitlines()) <= 300


def copy_alone(tmp_path: Path, script: str) -> Path:
    folder = tmp_path / script
    folder.mkdir()
    for name in (script, "common", "harness", "tasks"):
        shutil.copy(ROOT / f"{name}.py", folder)
    return folder


def run_in(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=folder, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


def test_an_algorithm_file_copied_with_the_three_layers_runs_on_a_model_folder(tmp_path):
    folder = copy_alone(tmp_path, "grpo")
    p = run_in(folder, "grpo.py", "--model", str(ROOT / "models" / "tiny"), "--steps", "2", "--eval-every", "2",
               "--eval-size", "8", "--prompts-per-step", "2", "--group-size", "2", "--no-pass-at-k",
               "--out-dir", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "summary.json").is_file()
    folder = copy_alone(tmp_path, "ppo")  # ppo.py loads r_φ through tasks.py, not reward_model.py
    p = run_in(folder, "ppo.py", "--model", str(ROOT / "models" / "tiny-pref"), "--reward-model",
               str(ROOT / "models" / "tiny-pref-rm"), "--data", str(ROOT / "models" / "tiny-pref" / "pairs_heldout.jsonl"),
               "--steps", "1", "--batch-size", "4", "--eval-every", "1",
               "--eval-samples", "4", "--out-dir", str(tmp_path / "ppo-run"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "ppo-run" / "summary.json").is_file()


def test_the_embedded_name_without_models_says_where_it_looked(tmp_path):
    folder = copy_alone(tmp_path, "grpo")
    p = run_in(folder, "grpo.py", "--steps", "1", "--out-dir", str(tmp_path / "run"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--model tiny" in lines[0] and str(folder / "models") in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # nothing left behind
    # ppo.py with no --reward-model on a model of its own trains one with reward_model.py, which is
    # not there: one line that says so and what to pass instead
    folder = copy_alone(tmp_path, "ppo")
    p = run_in(folder, "ppo.py", "--model", str(ROOT / "models" / "tiny-pref"), "--steps", "1",
               "--data", str(ROOT / "models" / "tiny-pref" / "pairs_heldout.jsonl"), "--out-dir", str(tmp_path / "ppo-run"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--reward-model" in p.stderr and "reward_model.py" in p.stderr, p.stderr
    assert not (tmp_path / "ppo-run").exists()
