"""bench/bench_memory.py: the probe counts each part's bytes exactly, and the fit recovers a bilinear law.

    /work/main/.venv/bin/python -m pytest -q bench/test_bench_memory.py
"""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_memory  # noqa: E402

# A script the probe runs: a trained Linear (AdamW), a frozen one, and a cache kept across the steps.
TOY = """
import torch
trained = torch.nn.Linear(100, 50)          # 5,050 float32 weights: 20,200 bytes
frozen = torch.nn.Linear(10, 10).requires_grad_(False)   # 110 float32: 440 bytes
cache = torch.zeros(7, 1000, dtype=torch.float64)        # 56,000 bytes, kept across the steps
opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
for _ in range(2):
    opt.zero_grad(set_to_none=True)
    trained(torch.randn(4, 100)).sum().backward()
    opt.step()
"""


def test_probe_counts_every_part(tmp_path):
    script, out = tmp_path / "toy.py", tmp_path / "probe.json"
    script.write_text(TOY)
    subprocess.run([sys.executable, str(BENCH / "bench_memory.py"), "--probe", str(out), str(script)],
                   check=True, env=bench_memory.child_env())
    m = json.loads(out.read_text())
    assert m["error"] is None and len(m["snapshots"]) == 2
    parts = m["snapshots"][-1]["parts"]
    assert parts["trained_weights"] == 5050 * 4
    assert parts["gradients"] == 5050 * 4
    # AdamW: exp_avg and exp_avg_sq per weight, and a float32 step counter per parameter tensor
    assert parts["optimizer_state"] == 2 * 5050 * 4 + 2 * 4
    assert parts["frozen_weights"] == 110 * 4
    assert parts["caches"] >= 56000  # the cache, and whatever small tensors the run holds
    assert {"tensor": "[7, 1000] float64", "bytes": 56000} in m["snapshots"][-1]["largest_caches"]
    row = bench_memory.measured({}, m)
    p = row["parts"]
    assert p["step_temporaries"] is not None  # the peak inside AdamW's steps, apart from the passes'
    assert row["peak"] == sum(p[k] for k in bench_memory.PARTS[:5]) + max(p["activations"], p["step_temporaries"])


def test_fit_recovers_a_bilinear_law_and_extrapolates():
    def law(L, b):
        return 3 + 5 * L + b * (7 + 11 * L)
    coef = bench_memory.fit([(L, b, law(L, b)) for L in (1, 2) for b in (1 / 16, 1 / 8)])
    assert abs(bench_memory.predict(coef, 24, 1.0) - law(24, 1.0)) < 1e-6


def test_recipes_micro_and_rows_are_the_recipes_flags():
    """`micro` and `rows`, which the fit scales to, are those of the recipe's own flags (`full`, the
    README's GPU recipe): a micro-batch changed in one place and not the other fails here."""
    for name, r in bench_memory.RECIPES.items():
        flags = r["full"]
        value = {flags[i]: int(flags[i + 1]) for i in range(0, len(flags), 2)}
        rows = value["--prompts-per-step"] * value["--group-size"] if name == "grpo" else value["--batch-size"]
        assert (value["--micro-batch"], rows) == (r["micro"], r["rows"]), name
