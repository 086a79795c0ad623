"""Learning-curve pictures from run folders (bench-only: needs matplotlib, see bench/requirements.txt).

    python bench/plot.py runs/grpo__s1__...                      # -> runs/grpo__s1__.../curves.png
    python bench/plot.py runs/dpo__s1__... --out dpo.png
    python bench/plot.py runs/dqn_maze__s1__... --maze           # also draw the greedy policy
    python bench/plot.py --overopt bench/results/ppo.json --out bench/results/ppo_overopt.png
    python bench/plot.py --ppo-updates bench/results/ppo_updates.json --out bench/results/ppo_updates.png

A run folder is what every script writes: `metrics.jsonl` (one JSON object per logged step) and
`summary.json`. The curves are whatever the run logged of four kinds, each against the step:
reward (or score, DPO's reward margin, DQN's episodic return), accuracy or gold reward (the
evaluations), KL to the reference, and loss. Per-step series are drawn thin with a moving
average on top; evaluations are drawn with markers.

`--overopt` draws PPO's over-optimisation picture from bench/bench_ppo.py's results: the proxy
(reward-model) score and the gold reward of samples against their KL to π_ref, for the β = 0 and
β = 0.05 runs, with best-of-n and DPO as points.

`--ppo-updates` draws bench/bench_ppo_updates.py's results: PPO-clip, PPO-penalty and TRPO, each
seed a thin line and the mean over seeds a thick one, for the held-out gold reward, the KL to π_ref
and KL(π_old ‖ π_θ) of every update, against the step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANELS = [  # (title, candidate keys: every one the run logged is drawn)
    ("reward", ["reward/mean", "objective/scores", "objective/gold_reward", "rewards/margins",
                "dqn/episodic_return", "tabular/episodic_return"]),
    ("evaluation", ["eval/accuracy", "eval/gold_reward", "eval/score", "eval/heldout_accuracy",
                    "eval/heldout_pair_accuracy", "dqn/max_q_error", "tabular/max_q_error"]),
    ("KL to the reference (nats)", ["kl/ref", "kl/ref_seq", "objective/kl", "eval/kl_to_ref"]),
    ("entropy (nats per token)", ["policy/entropy"]),
    ("loss", ["loss/policy", "loss/pseudo", "loss/value", "loss/ptx", "loss", "loss/bt",
              "losses/td_loss"]),
]


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no metrics.jsonl here (give a run folder written by one of the scripts)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(key) is not None]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)) if pts else (None, None)


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:window] / np.arange(1, window)  # the first points average what there is
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot_run(run: Path, out: Path, maze: bool = False) -> Path:
    rows = read_metrics(run)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    def drawn(k):  # logged, and not identically 0 (e.g. the KL of a run with β = 0)
        y = series(rows, k)[1]
        return y is not None and bool(np.any(y != 0))
    panels = [(t, [k for k in keys if drawn(k)]) for t, keys in PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    extra = 1 if maze else 0
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(4.2 * (len(panels) + extra), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            x, y = series(rows, k)
            dense = len(x) > 50 and not k.startswith("eval/")
            if dense:
                line, = ax.plot(x, y, lw=0.6, alpha=0.3)
                ax.plot(x, moving_average(y, max(5, len(y) // 50)), lw=1.6, color=line.get_color(), label=k)
            else:
                ax.plot(x, y, marker="o", ms=3, lw=1.4, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if maze:
        draw_maze(run, summary, axes[0][-1])
    script = summary.get("script") or run.name.split("__")[0]
    fig.suptitle(f"{script}: {run.name}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_maze(run: Path, summary: dict, ax) -> None:
    """The maze and the DQN's greedy action in every reachable cell (dqn_maze.py's q_network.pt)."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dqn_maze

    rows, cfg = summary["maze"], summary["config"]
    m = dqn_maze.Maze(rows, cfg["max_episode_steps"])
    net = dqn_maze.q_network(m.n_states, m.n_actions, cfg["hidden"])
    net.load_state_dict(torch.load(run / "q_network.pt", map_location="cpu", weights_only=True))
    with torch.no_grad():
        q = net(torch.eye(m.n_states)).numpy()  # [S, A]
    colours = {"#": "0.25", "G": "tab:green", "T": "tab:red", "S": "tab:blue", ".": "white"}
    for i, row in enumerate(rows):
        for j, ch in enumerate(row):
            ax.add_patch(plt.Rectangle((j, -i - 1), 1, 1, facecolor=colours[ch], edgecolor="0.6",
                                       alpha=0.35 if ch in "ST" or ch == "G" else 1))
            s = i * m.W + j
            if s in set(m.reachable.tolist()) and ch not in "GT#":
                arrow = dqn_maze.ARROWS[int(q[s].argmax())]
                ax.text(j + 0.5, -i - 0.5, {"^": "↑", "v": "↓", "<": "←", ">": "→"}.get(arrow, arrow),
                        ha="center", va="center", fontsize=14)
            if ch in "SGT":
                ax.text(j + 0.1, -i - 0.15, ch, ha="left", va="top", fontsize=7)
    ax.set_xlim(0, m.W)
    ax.set_ylim(-m.H, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("DQN greedy policy (G goal, T trap)")


def plot_overopt(results: Path, out: Path) -> Path:
    res = json.loads(results.read_text())
    rows = {r["run"]: r for r in res["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    if "overopt-beta-0" in rows:  # the run that games the reward model: a line through its evaluations
        c = rows["overopt-beta-0"]["curve"]
        kl = [p["kl"] for p in c]
        axes[0].plot(kl, [p["score"] for p in c], "-o", ms=3, color="tab:orange", label="PPO β = 0: proxy (reward model)")
        axes[0].plot(kl, [p["gold"] for p in c], "-o", ms=3, color="tab:blue", label="PPO β = 0: gold")
    if "overopt-beta-0.05" in rows:  # the same with the KL penalty: it stays put, so only markers
        c = rows["overopt-beta-0.05"]["curve"]
        kl = [p["kl"] for p in c]
        axes[0].plot(kl, [p["score"] for p in c], "x", ms=6, color="tab:orange", label="PPO β = 0.05: proxy")
        axes[0].plot(kl, [p["gold"] for p in c], "x", ms=6, color="tab:blue", label="PPO β = 0.05: gold")
    axes[0].set_xscale("symlog", linthresh=1)
    if "best-of-n" in rows:
        b = rows["best-of-n"]["rows"]
        axes[1].plot([p["kl"] for p in b], [p["gold"] for p in b], "s-", color="tab:green", label="best-of-n (gold)")
        for p in b:
            axes[1].annotate(f"n={p['n']}", (p["kl"], p["gold"]), fontsize=7, xytext=(3, -9),
                             textcoords="offset points")
    ppo_pts = [r for n, r in rows.items() if r.get("command", "").startswith("python ppo.py")
               and not n.startswith("overopt")]
    if ppo_pts:
        axes[1].plot([r["kl_to_ref"] for r in ppo_pts], [r["final_gold_reward"] for r in ppo_pts], "o",
                     color="tab:blue", label="PPO (β sweep, adaptive, ptx)")
    dpo_pts = [r for n, r in rows.items() if n.startswith("dpo")]
    if dpo_pts:
        axes[1].plot([r["kl_to_ref"] for r in dpo_pts], [r["final_gold_reward"] for r in dpo_pts], "^",
                     color="tab:purple", ms=8, label="DPO (β 0.1, 0.5)")
    axes[0].set_title("over-optimisation: proxy vs gold as KL grows")
    axes[1].set_title("gold reward at the KL each method spends")
    for ax in axes:
        ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean over 500 held-out samples")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_updates(results: Path, out: Path) -> Path:
    res = json.loads(results.read_text())
    losses = list(dict.fromkeys(r["loss"] for r in res["rows"]))
    colors = dict(zip(["clip", "kl-penalty", "trpo"], ["tab:blue", "tab:orange", "tab:green"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("gold reward of held-out samples", "gold"), ("KL(π ‖ π_ref), nats per completion", "kl")]
    for ax, (title, key) in zip(axes[:2], panels):
        for loss in losses:
            rs = [r for r in res["rows"] if r["loss"] == loss]
            for r in rs:
                ax.plot([c["step"] for c in r["curve"]], [c[key] for c in r["curve"]], lw=0.7, alpha=0.35,
                        color=colors.get(loss))
            n = min(len(r["curve"]) for r in rs)  # the seeds share their evaluation steps
            ax.plot([c["step"] for c in rs[0]["curve"][:n]],
                    np.mean([[c[key] for c in r["curve"][:n]] for r in rs], axis=0), "-o", ms=3, lw=1.8,
                    color=colors.get(loss), label=f"{loss} (mean of {len(rs)})")
        ax.set_title(title)
    ax = axes[2]
    for loss in losses:
        rs = [r for r in res["rows"] if r["loss"] == loss]
        for r in rs:
            y = np.array(r["kl_old_per_step"])
            ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.3, color=colors.get(loss))
        n = min(len(r["kl_old_per_step"]) for r in rs)
        y = np.mean([r["kl_old_per_step"][:n] for r in rs], axis=0)
        ax.plot(np.arange(1, n + 1), moving_average(y, 5), lw=1.8, color=colors.get(loss), label=loss)
    delta = res.get("defaults", {}).get("trpo_delta")
    if delta:
        ax.axhline(delta, ls="--", lw=0.8, color="gray", label=f"δ = d_targ = {delta}")
    ax.set_yscale("log")
    ax.set_title("KL(π_old ‖ π_θ) of each update, nats per token")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run folders (each holds metrics.jsonl)")
    ap.add_argument("--out", help="PNG to write (default: <run>/curves.png; one run only)")
    ap.add_argument("--maze", action="store_true", help="dqn_maze.py runs: also draw the greedy policy")
    ap.add_argument("--overopt", help="bench/results/ppo.json: draw PPO's over-optimisation picture")
    ap.add_argument("--ppo-updates", help="bench/results/ppo_updates.json: draw clip vs kl-penalty vs trpo")
    a = ap.parse_args()
    if a.ppo_updates:
        print(plot_updates(Path(a.ppo_updates), Path(a.out or "bench/results/ppo_updates.png")))
        return
    if a.overopt:
        print(plot_overopt(Path(a.overopt), Path(a.out or "bench/results/ppo_overopt.png")))
        return
    if not a.runs:
        ap.error("give at least one run folder, or --overopt RESULTS.json")
    if a.out and len(a.runs) > 1:
        ap.error("--out names one file: give one run folder with it")
    for run in map(Path, a.runs):
        print(plot_run(run, Path(a.out) if a.out else run / "curves.png", a.maze))


if __name__ == "__main__":
    main()
