"""
Peak memory of ``tdmpc-zoo enjoy`` on a TD-MPC trained with a 1M-transition replay buffer.

1. ``tdmpc-zoo train`` on reach-v3 with the shipped hyperparameters (paper-size network,
   ``buffer_size`` 1e6) and a tiny budget, into a zoo log folder;
2. ``tdmpc-zoo enjoy`` on that folder, headless, in a child process: its peak RSS;
3. for comparison, the same enjoy loading the model as plain ``TDMPC.load`` would (the trained
   ``buffer_size``), and the floor: a process that only imports what enjoy imports.

Peak RSS is each child's own ``ru_maxrss`` (``os.wait4``). Run from the repository root:

    python benchmarks/enjoy_memory.py [--folder /tmp/enjoy_memory] [--steps 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENV_ID = "reach-v3"

# enjoy with TD-MPC registered as plain TDMPC: the model is loaded with its trained buffer_size.
FULL_BUFFER_ENJOY = """
import sys
from sb3_tdmpc import zoo
zoo.register(inference=False)
from rl_zoo3.enjoy import enjoy
sys.argv = ["enjoy", *sys.argv[1:]]
enjoy()
"""
IMPORTS_ONLY = "import sb3_tdmpc.zoo, rl_zoo3.enjoy, rl_zoo3.exp_manager"


def peak_rss_mib(command: list[str], log: Path) -> float:
    """Run ``command`` to completion; return its peak resident set size in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}), see {log}")
    return usage.ru_maxrss / 1024  # Linux: KiB


def replay_buffer_mib(model_path: Path) -> dict[str, float]:
    """Bytes the replay buffer arrays take when loading for enjoy and with the trained buffer_size.

    NumPy allocates them zero-filled and Linux maps such pages lazily, so the full buffer is
    mostly address space on load (it counts fully on systems without overcommit).
    """
    from sb3_tdmpc import TDMPC
    from sb3_tdmpc.zoo import InferenceTDMPC

    def nbytes(model: TDMPC) -> float:
        buffer = model.replay_buffer
        arrays = [v for v in vars(buffer).values() if hasattr(v, "nbytes")] + [buffer.tree.nodes]
        return sum(a.nbytes for a in arrays) / 2**20

    return {
        "enjoy_replay_buffer_mib": nbytes(InferenceTDMPC.load(model_path, device="cpu")),
        "full_replay_buffer_mib": nbytes(TDMPC.load(model_path, device="cpu")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", type=Path, default=None, help="zoo log folder (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=250, help="enjoy steps (-n): one Meta-World episode")
    parser.add_argument(
        "--train-steps", type=int, default=600, help="training steps (-n of train; >= batch 512 + 50)"
    )
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="enjoy_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "sb3_tdmpc.zoo"]

    run = folder / "tdmpc" / f"{ENV_ID}_1"
    if not (run / f"{ENV_ID}.zip").exists():
        # Shipped hyperparameters: buffer_size 1e6, latent 50 / mlp 512 / enc 256, 512 samples x 6 iterations.
        # A few planning steps and updates after a seed phase of at least one batch (512): the zip is
        # what matters here.
        train = [
            *launcher,
            "train",
            "--algo",
            "tdmpc",
            "--env",
            ENV_ID,
            "-n",
            str(args.train_steps),
            "--eval-freq",
            "-1",
            "--seed",
            "0",
            "--num-threads",
            "1",
            "-f",
            str(folder),
            "-params",
            f"learning_starts:{args.train_steps - 50}",
            "seed_updates:10",
        ]
        train_rss = peak_rss_mib(train, folder / "train.log")
    else:
        train_rss = None

    enjoy_args = ["--algo", "tdmpc", "--env", ENV_ID, "-f", str(folder), "--no-render", "-n", str(args.steps)]
    enjoy_args += ["--num-threads", "1"]
    results = {
        "model_zip_mib": (run / f"{ENV_ID}.zip").stat().st_size / 2**20,
        "train_peak_rss_mib": train_rss,
        "imports_only_peak_rss_mib": peak_rss_mib(
            [sys.executable, "-c", IMPORTS_ONLY], folder / "imports.log"
        ),
        "enjoy_peak_rss_mib": peak_rss_mib([*launcher, "enjoy", *enjoy_args], folder / "enjoy.log"),
        "enjoy_full_buffer_peak_rss_mib": peak_rss_mib(
            [sys.executable, "-c", FULL_BUFFER_ENJOY, *enjoy_args], folder / "enjoy_full_buffer.log"
        ),
    }
    results.update(replay_buffer_mib(run / f"{ENV_ID}.zip"))
    results["enjoy_command"] = f"tdmpc-zoo enjoy {' '.join(enjoy_args)}"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
