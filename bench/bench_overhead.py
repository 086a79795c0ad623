"""How close is a grpo.py step to the floor? Run by hand (not in CI):

    python bench/bench_overhead.py

The floor is one bare forward and backward pass of the same model over the same tokens (the
`[B, P+T]` batch of one GRPO step, with a plain sum of the logits as the loss). A GRPO step adds
generation (G completions per prompt with the KV cache), scoring, the advantage, the per-token
log-probs and the clipped loss, and the AdamW update. Reported: the median time of each part, the
ratio of the step's training part to the floor, and the share of the step spent generating.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import grpo  # noqa: E402


def main(steps: int = 60):
    out = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    args = grpo.Args(steps=steps, out_dir=str(out / "run"), eval_every=10**6, log_every=10**6,
                     save_model=False, eval_size=50)
    summary = grpo.train(args)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_seconds" in r][10:]  # drop the warm-up steps
    step = statistics.median(r["time/step_seconds"] for r in rows)
    gen = statistics.median(r["time/generate_seconds"] for r in rows)
    length = statistics.median(r["completions/mean_length"] for r in rows)

    # the floor: the same model, the same batch shape, forward + backward and nothing else
    device = common.pick_device(None)
    model, tok = common.load_model("tiny", device)
    B = args.prompts_per_step * args.group_size
    L = 6 + args.max_new_tokens  # "37+48=" is at most 6 tokens, then the completion
    ids = torch.randint(3, len(tok), (B, L), device=device)
    times = []
    for i in range(40):
        t0 = time.perf_counter()
        model(input_ids=ids).logits.sum().backward()
        times.append(time.perf_counter() - t0)
    floor = statistics.median(times[5:])
    result = {"step_seconds": step, "generate_seconds": gen, "train_part_seconds": step - gen,
              "floor_seconds": floor, "step_over_floor": step / floor,
              "train_part_over_floor": (step - gen) / floor, "generate_share": gen / step,
              "median_completion_length": length, "batch": [B, L], "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "final_accuracy": summary["final_accuracy"]}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "overhead.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
