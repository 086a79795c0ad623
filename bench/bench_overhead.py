"""How close is a grpo.py step to the floor? Run by hand (not in CI):

    python bench/bench_overhead.py                  # torch's default threads
    OMP_NUM_THREADS=1 python bench/bench_overhead.py

One fixed batch of the default GRPO step (16 prompts × G 8 completions, sampled once from `tiny`)
is timed three ways, interleaved, so that a busy machine slows all three alike:

  generate   sampling the batch's completions with the KV cache (`common.generate_text`)
  train      the rest of a grpo.py step on that batch, as `grpo.train` does it: the per-token
             log-probs, the advantages, `grpo_loss`, backward, gradient clipping, the AdamW step
  floor      one bare forward and backward pass of the same model over the same tokens
             (input_ids and attention mask of the [B, P+T] batch, loss = sum of the kept logits)

Reported: the median of each, the ratio of the training part to the floor (the issue asks for a
step within 1.3× of it), the ratio of the whole step (generate + train) to the floor, and the share
of the step spent generating. Results go to bench/results/overhead.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

import harness  # noqa: E402

import tasks  # noqa: E402
import grpo  # noqa: E402


def main(repeats: int = 60):
    args = grpo.Args(beta=0.0)  # as measured (β = 0 was the default then)
    harness.seed_everything(args.seed)
    device = harness.pick_device(None)
    policy, tok = common.load_model("tiny", device)
    policy.eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-9, weight_decay=0.0)  # a step that changes ~nothing
    train_rows, _ = tasks.load_task(None)
    G = args.group_size
    rng = np.random.default_rng(0)
    rows = [train_rows[i] for i in rng.choice(len(train_rows), args.prompts_per_step, replace=False)]
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    answers = [r["answer"] for r in rows for _ in range(G)]

    def generate():
        return common.generate_text(policy, tok, prompts, args.max_new_tokens, args.temperature)

    p_ids, p_mask, c_ids, c_mask, texts, finished = generate()  # the fixed batch
    ids, mask = common.concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)  # [B, P+T]
    T = c_ids.shape[1]

    def train_part():  # what grpo.train does after sampling, with μ = 1 and β = 0
        rewards = torch.tensor([tasks.score(t, a, f) for t, a, f in zip(texts, answers, finished)])
        adv = grpo.group_advantages(rewards, G, args.scale_rewards, args.adv_eps)  # [B]
        logp, _ = common.token_logprobs(policy, ids, mask, T, args.temperature, with_entropy=True)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), adv, c_mask, None, 0.0, args.epsilon,
                                 args.epsilon_high, args.loss_agg, args.max_new_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def floor():  # the same model over the same tokens, forward and backward and nothing else
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                     logits_to_keep=T + 1, use_cache=False)
        out.logits.sum().backward()
        policy.zero_grad(set_to_none=True)

    times = {"generate": [], "train": [], "floor": []}
    for i in range(repeats + 5):
        for name, fn in (("generate", generate), ("train", train_part), ("floor", floor)):
            t0 = time.perf_counter()
            fn()
            if i >= 5:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = med["generate"] + med["train"]
    result = {
        "generate_ms": 1000 * med["generate"], "train_part_ms": 1000 * med["train"],
        "floor_ms": 1000 * med["floor"], "step_ms": 1000 * step,
        "train_part_over_floor": med["train"] / med["floor"], "step_over_floor": step / med["floor"],
        "generate_share_of_step": med["generate"] / step,
        "batch": list(ids.shape), "completion_tokens": int(c_mask.sum()), "repeats": repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "overhead.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
