"""Smoke test of benchmarks/speed.py: one call of each measurement, the JSON it writes (not its timings)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from sb3_tdmpc.common import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_writes_every_measurement(tmp_path):
    out = tmp_path / "speed.json"
    command = [sys.executable, "benchmarks/speed.py", "--horizon", "1", "--repeats", "1", "--loop-steps", "1"]
    command += ["--buffer-size", "2000", "--wait-quiet", "0", "--json", str(out)]
    run = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    results = json.loads(out.read_text())

    (horizon,) = results["horizons"]
    assert horizon["horizon"] == 1
    for what in ("plan", "update"):
        row = horizon[what]
        # The reference's FLOPs as pinned by test_reference_flop_counts_are_the_issues (H = 1), and fewer
        # computed here: the work removed without changing results.
        assert 0 < row["gflop"] < row["reference_gflop"]
        assert row["median_ms"] > 0 and row["matmul_gflops_median"] > 0
        floor_ms = row["reference_gflop"] / row["matmul_gflops_median"] * 1e3  # one call: its own rate
        assert math.isclose(row["ratio_median"], row["median_ms"] / floor_ms, rel_tol=1e-9)
    assert results["buffer"]["transitions"] == 2000
    assert results["buffer"]["sample_sequences"]["median_ms"] > 0
    loop = results["loop"]
    assert loop["steps_per_second"] > 0
    assert abs(sum(loop["share"].values()) - 1) < 1e-6
    assert results["memory"]["peak_rss_mib"] > 0
    assert "| plan | 1 |" in run.stdout and "agent steps/s" in run.stdout


def test_speed_experiments_run(tmp_path):
    # The experiments that need no torch.compile, one round each: every table is printed.
    command = [sys.executable, "benchmarks/speed_experiments.py", "--skip-chain", "--skip-plan"]
    command += ["--buffer-rounds", "2", "--gemm-rounds", "0", "--tall-rounds", "1"]
    command += ["--first-layer-rounds", "1", "--eager-bound-rounds", "1", "--weight-gradient-rounds", "1"]
    run = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    tables = ["| update (this package) |", "| input gradient |", "| its 118 matmuls alone"]
    tables += ["| R, 54 -> 512: x^T grad, copied |", "per update: "]
    tables += ["| floor (536 x 512 x 512) |"] if cpu_kernels.load() else []  # the tall matmuls' (row blocks)
    for table in tables:
        assert table in run.stdout
