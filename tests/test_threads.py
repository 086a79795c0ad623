"""CPU threads (`--threads`, `harness.set_threads`): one thread for a small model by default, the
flag's count when given, nothing on a GPU, the choice printed and in summary.json, and no number
changed by the thread count."""

from __future__ import annotations

import json

import pytest
import torch

import common
import harness

CPU = torch.device("cpu")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_a_small_model_gets_one_thread_a_large_one_torchs_default(restore_threads, capsys):
    small = torch.nn.Linear(10, 10)  # 110 parameters
    assert harness.set_threads(None, CPU, small) == 1 and torch.get_num_threads() == 1
    assert "CPU threads: 1 (the default for a model under 20M parameters" in capsys.readouterr().out
    large = torch.nn.Embedding(harness.SMALL_MODEL, 1)  # exactly SMALL_MODEL parameters: not small
    assert harness.set_threads(None, CPU, large) == harness.TORCH_THREADS == torch.get_num_threads()
    assert harness.set_threads(3, CPU, small) == 3 and torch.get_num_threads() == 3  # --threads wins
    assert "(--threads)" in capsys.readouterr().out.splitlines()[-1]


def test_a_gpu_run_changes_nothing_and_a_bad_count_is_one_line(restore_threads):
    torch.set_num_threads(2)
    assert harness.set_threads(None, torch.device("cuda"), torch.nn.Linear(2, 2)) is None  # no GPU needed
    assert torch.get_num_threads() == 2
    with pytest.raises(common.UsageError, match="--threads must be ≥ 1"):
        harness.set_threads(0, CPU)


def test_the_thread_count_changes_no_number_and_is_recorded(run_script, tmp_path):
    """The same short GRPO run with 1 and 2 threads: the same metrics, line by line (timings aside)."""
    rows = {}
    for n in (1, 2):
        out = tmp_path / f"t{n}"
        p = run_script("grpo.py", "--steps", "4", "--prompts-per-step", "4", "--eval-every", "2",
                       "--eval-size", "20", "--no-pass-at-k", "--threads", str(n), "--out-dir", str(out))
        assert p.returncode == 0, p.stderr
        assert f"CPU threads: {n} (--threads)" in p.stdout
        assert json.loads((out / "summary.json").read_text())["threads"] == n
        rows[n] = [{k: v for k, v in json.loads(line).items() if "time" not in k and "second" not in k}
                   for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == rows[2]
