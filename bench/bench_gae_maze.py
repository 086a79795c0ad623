"""GAE's bias and variance from λ = 0 to λ = 1 (notes `000`, "GAE"), measured against the exact
A^π on the maze of dqn_maze.py. Run by hand (not in CI); seconds on a CPU:

    python bench/bench_gae_maze.py                      # 2x3 maze, 20,000 episodes, seed 1
    python bench/bench_gae_maze.py --maze 6x6 --episodes 5000

The policy is fixed: π(a|s) = (1 − ε)·1[a = argmax_a Q*(s,a)] + ε/4, ε = --epsilon. Its exact V^π,
Q^π and A^π come from `dqn_maze.policy_evaluation` (a linear solve). Episodes are sampled from
the start; on every step t of every episode

    δ_t = r_t + γ (1 − done_t) V̂(s_{t+1}) − V̂(s_t),      Â_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l}

(the sum stops at the episode's end; a step-limit cut bootstraps from V̂ of the last state). Two
value functions V̂: V^π itself (exact), and V^π plus a fixed N(0, --noise²) error per state
(perturbed). Per λ, over the (s, a) pairs the episodes visit, weighted by visits:
  bias   √(Σ w_sa (mean Â | s,a − A^π(s,a))²)   the RMS bias of Â against A^π;
  bias Q √(Σ w_sa (mean (Â + V̂(s)) | s,a − Q^π(s,a))²), the bias of Â once its state-only part is
         set aside: an error of V̂(s_t) that does not depend on a_t is a baseline and leaves the
         policy gradient unbiased, so this is the bias that reaches ∇J;
  var    Σ w_sa Var(Â | s,a), the variance of Â around its own mean in each (s, a);
  s.e.   √(Σ w_sa Var(Â | s,a) / n_sa), the sampling error of the means: a bias below it is noise.
On a deterministic maze the only randomness is π's later actions, so λ = 0 with the exact V̂ has
δ_t = A^π(s_t, a_t) exactly: no bias and no variance.
What the notes predict: with the exact V every λ is unbiased, and the variance grows with λ; with a
wrong V, λ = 0 (the one-step TD error) is biased, λ = 1 (the Monte Carlo return minus V̂) is not,
in the bias that reaches the gradient, and λ trades one for the other.
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
from harness import main  # noqa: E402


@dataclass
class Args:
    maze: str = "2x3"
    """a dqn_maze.py maze: 2x3, 6x6 or a file"""
    gamma: float = 0.9
    """γ, as dqn_maze.py's default"""
    epsilon: float = 0.5
    """ε of the fixed policy: the Q*-greedy action with probability 1 − ε, else a uniform one"""
    noise: float = 1.0
    """σ of the fixed per-state error of the perturbed V̂ (V*(start) is 8.1 on 2x3)"""
    lambdas: str = "0,0.25,0.5,0.75,0.9,0.95,1"
    """the λs to tabulate"""
    episodes: int = 20_000
    """episodes sampled from the start"""
    max_episode_steps: int = 100
    """step limit of an episode (a cut episode bootstraps from V̂)"""
    seed: int = 1
    """seed of the episodes and of the perturbation"""


def gae(rewards: np.ndarray, v: np.ndarray, v_next: np.ndarray, done: np.ndarray, gamma: float,
        lam: float) -> np.ndarray:
    """Â_t = Σ_l (γλ)^l δ_{t+l} over one episode, by the backward recursion Â_t = δ_t + γλ Â_{t+1}.
    rewards, v (V̂(s_t)), v_next (V̂(s_{t+1})), done: [T] -> [T]"""
    delta = rewards + gamma * (1.0 - done) * v_next - v  # δ_t   [T]
    adv, acc = np.zeros_like(delta), 0.0
    for t in range(len(delta) - 1, -1, -1):
        acc = delta[t] + gamma * lam * acc  # Â_t = δ_t + γλ Â_{t+1}
        adv[t] = acc
    return adv  # [T]


def bench(args: Args) -> None:
    rows, source = dqn_maze.read_maze(args.maze)
    maze = dqn_maze.Maze(rows, args.max_episode_steps, source)
    rng = np.random.default_rng(args.seed)
    q_star = dqn_maze.value_iteration(maze.next_state, maze.reward, maze.done, args.gamma)  # [S, A]
    S, A = q_star.shape
    pi = np.full((S, A), args.epsilon / A)  # [S, A]
    pi[np.arange(S), q_star.argmax(1)] += 1 - args.epsilon
    V, Q, Adv = (x.numpy() for x in dqn_maze.policy_evaluation(
        maze.next_state, maze.reward, maze.done, torch.tensor(pi, dtype=torch.float64), args.gamma))
    v_hats = {"exact V": V, "perturbed V": V + rng.normal(0.0, args.noise, S)}
    lambdas = [float(x) for x in args.lambdas.split(",")]

    t0 = time.time()
    episodes = []  # (states [T], actions [T], rewards [T], next states [T], done [T])
    for _ in range(args.episodes):
        s, steps = maze.reset(), []
        while True:
            a = int(rng.choice(A, p=pi[s]))
            s2, r, done, truncated = maze.step(a)
            steps.append((s, a, r, s2, done))
            s = s2
            if done or truncated:
                break
        episodes.append(tuple(np.array(c) for c in zip(*steps)))
    n_steps = sum(len(e[0]) for e in episodes)
    print(f"maze {source}, γ = {args.gamma}, π = (1 − {args.epsilon}) greedy(Q*) + {args.epsilon} uniform, "
          f"V^π(start) = {V[maze.start]:.4f}; {args.episodes} episodes, {n_steps} steps, seed {args.seed}; "
          f"perturbed V̂: σ = {args.noise}\n")
    print("| λ | " + " | ".join(f"{k}: bias | bias Q | var | s.e." for k in v_hats) + " |")
    print("| --- " * (1 + 4 * len(v_hats)) + "|")
    for lam in lambdas:
        cells = []
        for vh in v_hats.values():
            s_all, a_all, adv_all = [], [], []
            for st, ac, rw, nx, dn in episodes:
                adv_all.append(gae(rw, vh[st], vh[nx], dn.astype(float), args.gamma, lam))  # Â_t   [T]
                s_all.append(st)
                a_all.append(ac)
            s_all, a_all, adv_all = np.concatenate(s_all), np.concatenate(a_all), np.concatenate(adv_all)
            key = s_all * A + a_all  # one id per (s, a)   [N]
            n = np.bincount(key, minlength=S * A).astype(float)  # visits   [S·A]
            seen = n > 0
            mean = np.bincount(key, adv_all, S * A)[seen] / n[seen]  # mean Â | s,a
            sq = np.bincount(key, adv_all ** 2, S * A)[seen] / n[seen]
            w = n[seen] / n.sum()
            a_true = Adv.reshape(-1)[seen]  # A^π(s,a)
            shift = (V - vh)[np.arange(S).repeat(A)][seen]  # (V^π − V̂)(s): the state-only part
            bias = np.sqrt((w * (mean - a_true) ** 2).sum())
            bias_q = np.sqrt((w * (mean - shift - a_true) ** 2).sum())  # mean(Â + V̂(s)) − Q^π = mean Â − (V − V̂) − A
            var_sa = np.maximum(sq - mean ** 2, 0.0)  # Var(Â | s,a)
            var = (w * var_sa).sum()
            se = np.sqrt((w * var_sa / n[seen]).sum())  # the sampling error of the means: a bias below it is noise
            cells += [f"{bias:.3f}", f"{bias_q:.3f}", f"{var:.2f}", f"{se:.3f}"]
        print(f"| {lam:g} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(Args, bench, __doc__)
