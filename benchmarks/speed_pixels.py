"""
Update cost of TD-MPC from pixels (``CnnPolicy``) against the same update from states.

At the settings of hyperparams/tdmpc.yml's pixel entries (batch 256, horizon 5, latent 50, MLP 512,
frame stack 3 at 84x84, i.e. ``(9, 84, 84)`` uint8 observations, 32-channel encoder), times as
median/min/max over ``--repeats``:

* ``update``: one world-model step and one policy-prior step (``_update_world_model`` +
  ``_update_policy_prior``) on a sampled batch, for pixels and for 24-dim states (same networks
  otherwise), and their ratio: what the pixel encoder and its augmentation add;
* the pixel parts of that update: the random shift of the (H+1) x B sampled frame stacks, the
  no-gradient encodings of the H x B next stacks (TD and consistency targets: online and target
  encoder) and the encoding of the B start stacks with its backward pass;
* ``sample_sequences`` from a buffer of uint8 frames (the batch stays uint8: 4x less to move).

The frames are random (no renderer needed). Run from the repository root, alone or through
``python benchmarks/speed.py --pixels``:

    python benchmarks/speed_pixels.py [--batch-size 256] [--horizon 5] [--repeats 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.logger import Logger

from sb3_tdmpc import TDMPC

IMAGE_SPACE = spaces.Box(0, 255, (9, 84, 84), np.uint8)
STATE_SPACE = spaces.Box(-np.inf, np.inf, (24,), np.float32)
ACTION_DIM = 6


class RandomObservations(gym.Env):
    """An env whose observations are random draws of its space: only the spaces matter here."""

    def __init__(self, observation_space: spaces.Box) -> None:
        self.observation_space = observation_space
        self.action_space = spaces.Box(-1, 1, (ACTION_DIM,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def make_model(pixels: bool, batch_size: int, horizon: int, fill: int, device: str) -> TDMPC:
    """TDMPC at the default (paper) sizes, its buffer filled with ``fill`` random transitions."""
    space = IMAGE_SPACE if pixels else STATE_SPACE
    model = TDMPC(
        "CnnPolicy" if pixels else "MlpPolicy",
        RandomObservations(space),
        buffer_size=fill + 1,
        batch_size=batch_size,
        horizon=horizon,
        learning_starts=0,
        seed_updates=0,
        device=device,
        seed=0,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))
    rb, rng = model.replay_buffer, np.random.default_rng(0)
    if pixels:
        rb.observations[:fill] = rng.integers(0, 256, (fill, 1, *space.shape), dtype=np.uint8)
        rb.next_observations[:fill] = rng.integers(0, 256, (fill, 1, *space.shape), dtype=np.uint8)
    else:
        rb.observations[:fill] = rng.standard_normal((fill, 1, *space.shape), dtype=np.float32)
        rb.next_observations[:fill] = rng.standard_normal((fill, 1, *space.shape), dtype=np.float32)
    rb.actions[:fill] = rng.uniform(-1, 1, (fill, 1, ACTION_DIM)).astype(np.float32)
    rb.rewards[:fill] = rng.random((fill, 1), dtype=np.float32)
    rb.pos = fill
    rb.tree.update(np.arange(fill), np.ones(fill))
    rb.update_priorities = lambda indices, priorities: None  # the update's own cost only
    return model


def timings(fn: Callable[[], Any], repeats: int, device: th.device) -> dict[str, float]:
    def now() -> float:
        if device.type == "cuda":
            th.cuda.synchronize()
        return time.perf_counter()

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append((now() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _time_update(model: TDMPC, data: Any, repeats: int) -> dict[str, float]:
    def update() -> None:
        _, latents = model._update_world_model(data)
        model._update_policy_prior(latents, data.masks)

    return timings(update, repeats, model.device)


def _time_pixel_parts(model: TDMPC, data: Any, repeats: int) -> dict[str, Any]:
    batch_size, horizon = data.observations.shape[1], data.observations.shape[0] - 1
    rb, policy = model.replay_buffer, model.policy
    encoder = policy.model.encoder
    frames = policy.augment(data.observations)

    def encode_targets() -> None:
        with th.no_grad():
            encoder(frames[1:])
            encoder(frames[1:])

    return {
        f"random shift of {horizon + 1}x{batch_size} stacks": timings(
            lambda: policy.augment(data.observations), repeats, model.device
        ),
        f"encode {horizon}x{batch_size} next stacks x2, no grad": timings(
            encode_targets, repeats, model.device
        ),
        f"encode {batch_size} start stacks + backward": timings(
            lambda: encoder(frames[0]).sum().backward(), repeats, model.device
        ),
        "sample_sequences (uint8 frames)": timings(
            lambda: rb.sample_sequences(batch_size, horizon), repeats, model.device
        ),
    }


def measure(
    batch_size: int = 256, horizon: int = 5, repeats: int = 5, fill: int = 1000, device: str = "cpu"
) -> dict[str, Any]:
    """The timings described in the module docstring, as a dict of ``{name: {median_ms, ...}}``."""
    results: dict[str, Any] = {"batch_size": batch_size, "horizon": horizon, "device": device}
    for name in ("state", "pixels"):
        model = make_model(name == "pixels", batch_size, horizon, fill, device)
        data = model.replay_buffer.sample_sequences(batch_size, horizon)
        results[f"update ({name})"] = _time_update(model, data, repeats)
        if name == "pixels":
            results.update(_time_pixel_parts(model, data, repeats))
    results["pixel / state update"] = (
        results["update (pixels)"]["median_ms"] / results["update (state)"]["median_ms"]
    )
    return results


def print_rows(results: dict[str, Any]) -> None:
    print()
    print(
        f"pixels, (9, 84, 84) uint8 with CnnPolicy vs 24-dim states, batch {results['batch_size']}, "
        f"horizon {results['horizon']}, device {results['device']}, {th.get_num_threads()} threads:"
    )
    print()
    print("| what | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for name, row in results.items():
        if isinstance(row, dict):
            print(f"| {name} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} |")
    print(f"| **pixel / state update** | **{results['pixel / state update']:.2f}x** | | |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=256, help="TD-MPC's pixel batch: 256")
    parser.add_argument("--horizon", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--fill", type=int, default=1000, help="transitions in the replay buffer")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print_rows(measure(args.batch_size, args.horizon, args.repeats, args.fill, args.device))


if __name__ == "__main__":
    main()
