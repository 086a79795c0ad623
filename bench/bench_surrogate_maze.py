"""Many epochs on one batch of rollouts (notes `004`: "many steps of optimisation on L^PG are
unstable"; PPO-clip is the fix): L^PG, the unclipped surrogate L^CPI and PPO-clip, each optimised
for K epochs on the same rollouts, with the exact KL to π_old and the exact return after K.
Run by hand (not in CI); seconds on a CPU:

    python bench/bench_surrogate_maze.py                    # 6x6 maze, seeds 1-3
    python bench/bench_surrogate_maze.py --maze 2x3 --seeds 1

The policy is tabular, π_θ(a|s) = softmax(θ[s]), on dqn_maze.py's maze; π_old = softmax(θ_old) with
θ_old ~ N(0, 0.5²). One batch of --episodes episodes is sampled from π_old, and every visited
(s_t, a_t) gets the exact advantage Â_t = A^{π_old}(s_t, a_t) (`dqn_maze.policy_evaluation`), so
that the three losses differ only in the objective (ppo.py's functions, one gradient step of Adam
on the whole batch per epoch):

    L^PG   = −mean_t log π_θ(a_t|s_t) Â_t                  (notes 004: the policy gradient loss)
    L^CPI  = −mean_t ρ_t Â_t                                (`ppo.ppo_penalty_loss` with β_pen = 0)
    L^CLIP = −mean_t min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t)  (`ppo.ppo_clip_loss`)

All three have the same gradient at θ = θ_old. After K epochs: KL = mean_t KL(π_old(·|s_t) ‖
π_θ(·|s_t)) over the batch's states (`ppo.policy_kl`, exact), and J = V^{π_θ}(start), the exact
discounted return of the updated policy (against J(π_old) and V*(start)).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dqn_maze  # noqa: E402  (needs sys.path above)
import ppo  # noqa: E402
from harness import main  # noqa: E402


@dataclass
class Args:
    maze: str = "6x6"
    """a dqn_maze.py maze: 2x3, 6x6 or a file"""
    gamma: float = 0.9
    """γ, as dqn_maze.py's default"""
    episodes: int = 64
    """episodes of the one batch, sampled from π_old"""
    max_episode_steps: int = 100
    """step limit of an episode"""
    epochs: str = "1,2,5,10,20,50,100"
    """the Ks at which KL and J are measured"""
    lr: float = 0.05
    """Adam's learning rate on the tabular logits"""
    epsilon: float = 0.2
    """ε of PPO-clip"""
    seeds: str = "1,2,3"
    """seeds of θ_old and of the batch"""


def sample_batch(maze, pi: np.ndarray, episodes: int, rng: np.random.Generator):
    """-> states, actions: [N] of every step of `episodes` episodes from π."""
    states, actions = [], []
    for _ in range(episodes):
        s = maze.reset()
        while True:
            a = int(rng.choice(pi.shape[1], p=pi[s]))
            s2, _, done, truncated = maze.step(a)
            states.append(s)
            actions.append(a)
            s = s2
            if done or truncated:
                break
    return torch.tensor(states), torch.tensor(actions)


def exact_return(maze, theta: torch.Tensor, gamma: float) -> float:
    """J(π_θ) = V^{π_θ}(start), exact."""
    V, _, _ = dqn_maze.policy_evaluation(maze.next_state, maze.reward, maze.done,
                                         torch.softmax(theta.detach(), -1), gamma)
    return float(V[maze.start])


def loss_of(kind: str, theta, old_logits, s, a, adv, mask, epsilon: float):
    logits = theta[s]  # [N, A]
    logp = torch.log_softmax(logits, -1).gather(1, a[:, None]).T  # log π_θ(a_t|s_t)   [1, N]
    old_logp = torch.log_softmax(old_logits, -1).gather(1, a[:, None]).T  # [1, N]
    if kind == "L^PG":
        return -(logp * adv).mean()  # −mean_t log π_θ(a_t|s_t) Â_t
    if kind == "L^CPI":
        kl = torch.zeros_like(logp)
        return ppo.ppo_penalty_loss(logp, old_logp, adv, kl, mask, beta=0.0)[0]  # −mean_t ρ_t Â_t
    return ppo.ppo_clip_loss(logp, old_logp, adv, mask, epsilon)[0]  # −mean_t min(ρÂ, clip(ρ)Â)


def bench(args: Args) -> None:
    rows, source = dqn_maze.read_maze(args.maze)
    maze = dqn_maze.Maze(rows, args.max_episode_steps, source)
    q_star = dqn_maze.value_iteration(maze.next_state, maze.reward, maze.done, args.gamma)
    ks = [int(k) for k in args.epochs.split(",")]
    kinds = ("L^PG", "L^CPI", "PPO-clip")
    results = {kind: {k: [] for k in ks} for kind in kinds}  # (KL, J) per seed
    starts = []
    t0 = time.time()
    for seed in (int(x) for x in args.seeds.split(",")):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        theta_old = 0.5 * torch.randn(maze.n_states, maze.n_actions, dtype=torch.float64)  # [S, A]
        pi_old = torch.softmax(theta_old, -1)  # [S, A]
        _, _, A_old = dqn_maze.policy_evaluation(maze.next_state, maze.reward, maze.done, pi_old, args.gamma)
        s, a = sample_batch(maze, pi_old.numpy(), args.episodes, rng)  # [N], [N]
        adv = A_old[s, a][None]  # Â_t = A^{π_old}(s_t, a_t)   [1, N]
        mask = torch.ones_like(adv)
        starts.append(exact_return(maze, theta_old, args.gamma))
        for kind in kinds:
            theta = theta_old.clone().requires_grad_(True)
            opt = torch.optim.Adam([theta], lr=args.lr)
            for epoch in range(1, max(ks) + 1):
                loss = loss_of(kind, theta, theta_old[s], s, a, adv, mask, args.epsilon)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if epoch in ks:
                    with torch.no_grad():
                        kl = float(ppo.policy_kl(theta_old[s], theta[s]).mean())  # mean_t KL(π_old‖π_θ)
                    results[kind][epoch].append((kl, exact_return(maze, theta, args.gamma)))
    print(f"maze {source}, γ = {args.gamma}, {args.episodes} episodes per batch, Adam lr {args.lr}, "
          f"ε = {args.epsilon}, seeds {args.seeds}: J(π_old) = {np.mean(starts):.3f} (mean), "
          f"V*(start) = {q_star[maze.start].max():.3f}\n")
    print("| epochs K | " + " | ".join(f"{k}: KL to π_old | {k}: J" for k in kinds) + " |")
    print("| --- " * (1 + 2 * len(kinds)) + "|")
    for k in ks:
        cells = []
        for kind in kinds:
            kl = np.array([x[0] for x in results[kind][k]])
            j = np.array([x[1] for x in results[kind][k]])
            cells += [f"{kl.mean():.3f} ({kl.min():.3f}–{kl.max():.3f})", f"{j.mean():+.2f} ({j.min():+.2f} to {j.max():+.2f})"]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(Args, bench, __doc__)
