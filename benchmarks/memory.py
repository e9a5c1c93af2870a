"""
Resident memory of a long run once the replay buffer is full: it must stay flat.

Two measurements, each in this process, RSS read from ``/proc/self/statm``:

``buffer`` (default): a ``PrioritizedReplayBuffer`` of Meta-World shapes (39-d observations, 4-d
actions) written one transition at a time, far past its capacity, each write followed, as in
training, by a prioritized ``sample_sequences`` and an ``update_priorities`` of the sampled starts.
Episodes end every 250 writes (Meta-World's length with action repeat 2), half as time-outs.

``learn``: ``TDMPC.learn`` itself (collection with the per-step RNG bookkeeping, storage, the
non-finite check, one gradient update per step, logging) on a fast synthetic 39-d task with tiny
networks, long past a small buffer's capacity.

Growth is the RSS at the end minus the RSS when the buffer has just become full (every row of its
arrays written once, so every page of them resident). Run from the repository root:

    python benchmarks/memory.py                      # buffer: 100k capacity, 300k writes
    python benchmarks/memory.py --mode learn         # TDMPC.learn: 5k capacity, 40k steps
"""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces

OBS_DIM, ACTION_DIM, EPISODE = 39, 4, 250


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Report:
    """Prints RSS at intervals and the growth between the reference point and the end."""

    def __init__(self, capacity: int, total: int, every: int) -> None:
        self.capacity, self.total, self.every = capacity, total, every
        self.reference: float | None = None
        self.samples: list[tuple[int, float]] = []
        self.start = time.perf_counter()
        print(f"{'writes':>9} {'RSS MiB':>9} {'s':>7}")

    def __call__(self, writes: int) -> None:
        if writes % self.every and writes != self.total:
            return
        rss = rss_mib()
        self.samples.append((writes, rss))
        note = ""
        if writes == self.capacity:
            self.reference = rss
            note = "  <- reference: the buffer is full"
        print(f"{writes:>9} {rss:>9.1f} {time.perf_counter() - self.start:>7.0f}{note}", flush=True)

    def summary(self) -> None:
        final = self.samples[-1][1]
        after = [rss for writes, rss in self.samples if writes >= self.capacity]
        assert self.reference is not None, "write more than the capacity, and `every` must divide it"
        print(
            f"RSS growth over the {self.total - self.capacity} writes into the full buffer: "
            f"{final - self.reference:+.1f} MiB (min {min(after):.1f}, max {max(after):.1f}, "
            f"final {final:.1f} MiB)"
        )


def run_buffer(capacity: int, writes: int, batch_size: int, horizon: int, every: int) -> None:
    import torch as th

    from sb3_tdmpc.common.buffers import PrioritizedReplayBuffer

    th.set_num_threads(1)
    rng = np.random.default_rng(0)
    buffer = PrioritizedReplayBuffer(
        capacity,
        spaces.Box(-1, 1, (OBS_DIM,), np.float32),
        spaces.Box(-1, 1, (ACTION_DIM,), np.float32),
        device="cpu",
    )
    print(
        f"buffer: capacity {capacity}, {writes} writes, sample_sequences({batch_size}, {horizon}) after each"
    )
    report = Report(capacity, writes, every)
    obs = rng.standard_normal((1, OBS_DIM), dtype=np.float32)
    for t in range(1, writes + 1):
        next_obs = rng.standard_normal((1, OBS_DIM), dtype=np.float32)
        done = t % EPISODE == 0
        infos = [{"TimeLimit.truncated": done and t % (2 * EPISODE) == 0}]
        action = rng.uniform(-1, 1, (1, ACTION_DIM)).astype(np.float32)
        buffer.add(obs, next_obs, action, rng.standard_normal(1).astype(np.float32), np.array([done]), infos)
        obs = next_obs
        batch = buffer.sample_sequences(batch_size, horizon)
        buffer.update_priorities(batch.indices, rng.uniform(0, 2, batch_size))
        report(t)
    report.summary()


class SyntheticTask(gym.Env):
    """Cheap 39-d linear dynamics with a quadratic reward, truncated every 250 steps."""

    observation_space = spaces.Box(-10, 10, (OBS_DIM,), np.float32)
    action_space = spaces.Box(-1, 1, (ACTION_DIM,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.state = 0, self.np_random.standard_normal(OBS_DIM).astype(np.float32)
        return self.state, {}

    def step(self, action):
        self.t += 1
        self.state = np.clip(0.95 * self.state + 0.1 * np.resize(action, OBS_DIM), -10, 10).astype(np.float32)
        return self.state, -float(np.square(self.state).mean()), False, self.t >= EPISODE, {}


def run_learn(capacity: int, steps: int, every: int) -> None:
    import torch as th
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import configure

    from sb3_tdmpc import TDMPC

    th.set_num_threads(1)
    report = Report(capacity, steps, every)

    class Measure(BaseCallback):
        def _on_step(self) -> bool:
            report(self.model.num_timesteps)
            return True

    model = TDMPC(
        "MlpPolicy",
        make_vec_env(SyntheticTask, n_envs=1, seed=0),
        seed=0,
        buffer_size=capacity,
        learning_starts=500,
        seed_updates=10,
        batch_size=32,
        num_samples=32,
        num_elites=4,
        planning_iterations=1,
        horizon=3,
        policy_kwargs=dict(latent_dim=8, mlp_dim=32, enc_dim=16),
    )
    model.set_logger(configure(None, []))
    print(f"TDMPC.learn: buffer capacity {capacity}, {steps} steps, one gradient update per step")
    model.learn(steps, callback=Measure(), log_interval=1)
    report.summary()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["buffer", "learn"], default="buffer")
    parser.add_argument("--capacity", type=int, help="buffer size (default: 100000 buffer, 5000 learn)")
    parser.add_argument(
        "--writes", type=int, help="transitions written (default: 300000 buffer, 40000 learn)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--horizon", type=int, default=5)
    parser.add_argument("--every", type=int, help="print RSS every this many writes")
    args = parser.parse_args()
    if args.mode == "buffer":
        capacity, writes = args.capacity or 100_000, args.writes or 300_000
        run_buffer(capacity, writes, args.batch_size, args.horizon, args.every or capacity // 4)
    else:
        capacity, writes = args.capacity or 5_000, args.writes or 40_000
        run_learn(capacity, writes, args.every or capacity)


if __name__ == "__main__":
    main()
