"""bench/gpu_check.py's dry run: the GPU check's code, on a tiny shape on the CPU, stays green.

`python bench/gpu_check.py --device cpu --dry-run` runs what a GPU machine runs (every script's
defaults for a few steps, then grpo, dpo, reward_model and ppo on a random model of Qwen2.5-0.5B's
architecture, here at a tiny shape), each script in its own subprocess: about a minute on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["grpo", "reinforce", "dpo", "reward_model", "ppo", "dqn_maze",
        "qwen_grpo", "qwen_dpo", "qwen_reward_model", "qwen_ppo"]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("torch", "transformers", "device_name", "date", "total_seconds"):
        assert result[key] is not None, key
    assert result["dry_run"] and result["qwen"]["tokenizer"] == "Qwen2Tokenizer"
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == RUNS  # every run, in order
    for name, r in runs.items():
        assert r["ok"] and r["returncode"] == 0 and r["error"] is None, (name, r["error"])
        assert r["step_seconds"] > 0 and r["per_second"] > 0, name
        assert r["peak_gpu_gib"] is None  # no CUDA on the CPU: null, not 0
        if name == "dqn_maze":  # no start weights to compare: its Q network starts from the seed
            assert r["weights_changed"] is None
            continue
        # float32 on the CPU, so every trained weight moves. For reward_model the share counts only
        # the weights that could move: the embedding rows of tokens that no batch held get no
        # gradient (the reward model reads hidden states, not the tied LM head), so
        # gpu_check.weights_changed counts the rows that moved (see its docstring)
        assert r["weights_changed"] > 0.9, (name, r["weights_changed"])
        if r["kl_at_start"] is not None:  # π_θ = π_ref before the first update: exactly 0
            assert r["kl_at_start"] == 0.0, name
    md = out.with_suffix(".md")
    assert md.is_file() and "| qwen_ppo | qwen | yes |" in md.read_text()
