"""End-to-end smoke test of benchmarks/learning.py on a tiny budget (CSV columns, PNG written)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # the `bench` extra
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "learning.py"
COLUMNS = ["algo", "env", "seed", "env_steps", "agent_steps", "success", "return", "wall_s"]
TINY_TDMPC = [
    "learning_starts:100",
    "seed_updates:5",
    "batch_size:16",
    "num_samples:32",
    "num_elites:4",
    "planning_iterations:1",
    "horizon:2",
    "buffer_size:1000",
    "policy_kwargs:dict(latent_dim=4,mlp_dim=16,enc_dim=16)",
]


def run_benchmark(tmp_path: Path, *args: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out), "--no-progress"],
        check=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    return out


def test_learning_benchmark_end_to_end(tmp_path: Path) -> None:
    out = run_benchmark(
        tmp_path,
        "--env", "Pendulum-v1",
        "--algos", "tdmpc", "sac",
        "--seeds", "0",
        "--env-steps", "200",
        "--eval-freq", "100",
        "--eval-episodes", "1",
        "--jobs", "2",
        "--sac-params", "learning_starts:50", "batch_size:16", "policy_kwargs:dict(net_arch=[16])",
        "--tdmpc-params", *TINY_TDMPC,
    )  # fmt: skip
    with open(out / "Pendulum-v1.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert {r["algo"] for r in rows} == {"tdmpc", "sac"}
    for algo in ("tdmpc", "sac"):
        steps = [int(r["env_steps"]) for r in rows if r["algo"] == algo]
        assert steps == [0, 100, 200]
    for r in rows:
        assert r["env"] == "Pendulum-v1" and r["seed"] == "0"
        assert int(r["env_steps"]) == int(r["agent_steps"])  # no action repeat outside Meta-World
        assert math.isnan(float(r["success"]))
        assert math.isfinite(float(r["return"])) and float(r["wall_s"]) >= 0
    png = out / "Pendulum-v1.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_benchmark_metaworld_counts_simulator_steps(tmp_path: Path) -> None:
    """A Meta-World id: success column, env_steps = 2 x agent_steps, published curves drawn."""
    out = run_benchmark(
        tmp_path,
        "--env", "reach-v3",
        "--algos", "tdmpc",
        "--seeds", "0",
        "--env-steps", "200",
        "--eval-freq", "200",
        "--eval-episodes", "1",
        "--reference",
        "--tdmpc-params", *TINY_TDMPC, "learning_starts:50",
    )  # fmt: skip
    with open(out / "reach-v3.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["env_steps"]), int(r["agent_steps"])) for r in rows] == [(0, 0), (200, 100)]
    assert all(float(r["success"]) in (0.0, 1.0) for r in rows)
    # With the published curves the figure has a second panel (12 x 4.2 in, not 6.5 x 4.2).
    import matplotlib.image

    height, width = matplotlib.image.imread(out / "reach-v3.png").shape[:2]
    assert width > 2.5 * height
