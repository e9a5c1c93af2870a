"""
Learning curves: TD-MPC against SB3's SAC (and sb3-contrib's TQC) on the same budget.

Every algorithm trains on the same environment id, the same budget of **simulator** steps and the
same seeds, with a deterministic evaluation every ``--eval-freq`` simulator steps (and at step 0):
success rate for Meta-World tasks (``info["is_success"]`` at the end of each episode), mean
episode return otherwise. Results: one CSV with the columns

    algo, env, seed, env_steps, agent_steps, success, return, wall_s

and a PNG (mean over seeds, shaded min-max spread). ``--reference`` adds the published Meta-World
curves of the task (TD-MPC, SAC, TD-MPC2, DreamerV3; see benchmarks/reference/README.md).

Counting is explicit. ``env_steps`` counts simulator steps, ``agent_steps`` counts agent decisions
(``env.step`` calls, SB3's ``num_timesteps``); ``env_steps = agent_steps * action_repeat``. The
Meta-World ids of sb3_tdmpc repeat each action twice by default (``--action-repeat`` changes it
for every algorithm alike); other environments have an action repeat of 1. ``--env-steps`` and
``--eval-freq`` are simulator steps; the hyperparameters (``learning_starts``, schedules) count
agent steps, as in SB3 and rl-zoo3. ``wall_s`` is training wall-clock time so far, evaluation
excluded. ``success`` is NaN outside Meta-World.

Settings:

- TD-MPC: ``--preset cpu`` (default) reads hyperparams/tdmpc_cpu.yml, ``--preset paper`` the
  shipped sb3_tdmpc/hyperparams/tdmpc.yml (official TD-MPC settings, meant for a GPU); the entry
  of the environment id, else ``default``. ``--tdmpc-params key:value ...`` overrides entries.
- SAC / TQC: rl-zoo3's tuned hyperparameters (rl_zoo3/hyperparams/{sac,tqc}.yml) when the id has
  an entry there (e.g. Pendulum-v1); otherwise (Meta-World) ``GENERIC_OFF_POLICY`` below: SB3's
  defaults with lr 3e-4, batch 256, a [256, 256] network, and ``learning_starts`` equal to the
  TD-MPC preset's seed steps. ``--sac-params`` / ``--tqc-params`` override entries.

Runs are independent processes (``--jobs`` at a time, one torch thread each). Each run appends
its rows to ``<out>/runs/<algo>_<env>_seed<k>.csv`` as it evaluates, so an interrupted run keeps
what it reached; ``--plot-only`` rebuilds the merged CSV and the PNG from those files (and from the
``runs/`` of subfolders of ``--out``, where further invocations of the same environment may write:
``--out benchmarks/results/<env>/<part>``). Example
(from the repository root):

    python benchmarks/learning.py --env reach-v3 --env-steps 50000 --seeds 0 1 2 \\
        --algos tdmpc sac --eval-freq 5000 --jobs 2 --reference --out benchmarks/results/reach-v3
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "cpu": ROOT / "hyperparams" / "tdmpc_cpu.yml",
    "paper": ROOT / "sb3_tdmpc" / "hyperparams" / "tdmpc.yml",
}
REFERENCE_DIRS = [ROOT / "benchmarks" / "reference", ROOT.parent / "shared" / "reference"]
REFERENCE_ALGOS = {
    "tdmpc": "TD-MPC (published)",
    "sac": "SAC (published)",
    "tdmpc2": "TD-MPC2",
    "dreamerv3": "DreamerV3",
}
# The published curves count agent steps at action repeat 2 (benchmarks/reference/README.md).
REFERENCE_ACTION_REPEAT = 2
COLUMNS = ["algo", "env", "seed", "env_steps", "agent_steps", "success", "return", "wall_s"]
# SAC/TQC on an id without rl-zoo3 entry (Meta-World): SB3 defaults, the usual lr/batch/network.
GENERIC_OFF_POLICY: dict[str, Any] = dict(
    learning_rate=3e-4,
    buffer_size=1_000_000,
    batch_size=256,
    gamma=0.99,
    tau=0.005,
    train_freq=1,
    gradient_steps=1,
    ent_coef="auto",
    policy_kwargs=dict(net_arch=[256, 256]),
)
# rl-zoo3 keys that are not constructor arguments of the algorithm.
ZOO_ONLY_KEYS = {
    "n_timesteps",
    "policy",
    "env_kwargs",
    "monitor_kwargs",
    "normalize",
    "n_envs",
    "callback",
    "env_wrapper",
    "frame_stack",
    "vec_env_wrapper",
}
_counter = None  # steps done by all runs of this process pool (progress bar)


# ----------------------------------------------------------------------------- settings


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"override {item!r} is not key:value")
        out[key] = _parse_value(value)
    return out


def _zoo_entry(path: Path, env_id: str, fallback: str | None = "default") -> dict[str, Any] | None:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    entry = data.get(env_id, data.get(fallback) if fallback else None)
    return None if entry is None else dict(entry)


def _constructor_kwargs(entry: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in entry.items() if k not in ZOO_ONLY_KEYS}
    for key in ("policy_kwargs", "replay_buffer_kwargs"):
        if isinstance(kwargs.get(key), str):  # rl-zoo3 writes them as "dict(...)"
            kwargs[key] = eval(kwargs[key], {"dict": dict})
    for key, value in list(kwargs.items()):
        if isinstance(value, str) and value.startswith("lin_"):
            from stable_baselines3.common.utils import LinearSchedule

            kwargs[key] = LinearSchedule(float(value[4:]), 0.0, 1.0)
    return kwargs


def algo_settings(algo: str, env_id: str, preset: str, overrides: dict[str, Any]) -> tuple[dict, str]:
    """Constructor kwargs of ``algo`` on ``env_id`` and a line saying where they come from."""
    if algo == "tdmpc":
        entry = _zoo_entry(PRESETS[preset], env_id)
        kwargs, source = _constructor_kwargs(entry), f"{PRESETS[preset].relative_to(ROOT)}"
    else:
        import rl_zoo3

        zoo_file = Path(rl_zoo3.__file__).parent / "hyperparams" / f"{algo}.yml"
        entry = _zoo_entry(zoo_file, env_id, fallback=None)
        if entry is not None:
            kwargs, source = _constructor_kwargs(entry), f"rl_zoo3/hyperparams/{algo}.yml[{env_id}]"
        else:
            tdmpc = _constructor_kwargs(_zoo_entry(PRESETS[preset], env_id))
            kwargs = {**GENERIC_OFF_POLICY, "learning_starts": tdmpc.get("learning_starts", 100)}
            source = "benchmarks/learning.py GENERIC_OFF_POLICY"
    kwargs.update(_constructor_kwargs(overrides))
    if overrides:
        source += f" + overrides {overrides}"
    return kwargs, source


def is_metaworld(env_id: str) -> bool:
    import gymnasium as gym

    import sb3_tdmpc  # noqa: F401  (registers the Meta-World ids)

    spec = gym.spec(env_id)
    return "metaworld" in str(spec.entry_point)


def action_repeat_of(env_id: str, action_repeat: int | None) -> int:
    if not is_metaworld(env_id):
        if action_repeat not in (None, 1):
            raise SystemExit(f"--action-repeat applies to the Meta-World ids only, not {env_id}")
        return 1
    if action_repeat is not None:
        return action_repeat
    import inspect

    from sb3_tdmpc.envs.metaworld import make_metaworld_env

    return int(inspect.signature(make_metaworld_env).parameters["action_repeat"].default)


# ----------------------------------------------------------------------------- one run


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def run_one(job: dict[str, Any]) -> str:
    """Train one (algo, seed) and append an evaluation row to its CSV every ``eval_freq`` steps."""
    import torch as th

    th.set_num_threads(1)
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    import sb3_tdmpc
    from sb3_tdmpc import TDMPC

    algo, env_id, seed, repeat = job["algo"], job["env"], job["seed"], job["action_repeat"]
    metaworld = job["metaworld"]
    env_kwargs = {"action_repeat": repeat} if metaworld else None
    agent_budget = job["env_steps"] // repeat
    eval_every = max(job["eval_freq"] // repeat, 1)
    classes: dict[str, Any] = {"tdmpc": TDMPC, "sac": SAC}
    if algo == "tqc":
        from sb3_contrib import TQC

        classes["tqc"] = TQC

    env = make_vec_env(env_id, n_envs=1, seed=seed, env_kwargs=env_kwargs)
    # One vectorised env per evaluation episode: TD-MPC plans them in one batch.
    eval_env = make_vec_env(env_id, n_envs=job["eval_episodes"], seed=10_000 + seed, env_kwargs=env_kwargs)
    model = classes[algo]("MlpPolicy", env, seed=seed, verbose=0, device="cpu", **job["kwargs"])
    path = Path(job["csv"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerow(COLUMNS)
    del gym, sb3_tdmpc

    state = {"train_s": 0.0, "t0": time.perf_counter(), "reported": 0}

    def evaluate(agent_steps: int) -> None:
        successes: list[float] = []

        def on_step(local_vars: dict, _globals: dict) -> None:
            if local_vars["done"]:
                successes.append(float(local_vars["info"].get("is_success", False)))

        returns, _ = evaluate_policy(
            model,
            eval_env,
            n_eval_episodes=job["eval_episodes"],
            deterministic=True,
            return_episode_rewards=True,
            callback=on_step if metaworld else None,
        )
        row = [
            algo,
            env_id,
            seed,
            agent_steps * repeat,
            agent_steps,
            float(np.mean(successes)) if metaworld else math.nan,
            float(np.mean(returns)),
            round(state["train_s"], 2),
        ]
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow(row)

    class EvalEvery(BaseCallback):
        def _on_step(self) -> bool:
            n = self.num_timesteps
            if _counter is not None and n - state["reported"] >= 50:
                with _counter.get_lock():
                    _counter.value += (n - state["reported"]) * repeat
                state["reported"] = n
            if n % eval_every == 0 or n == agent_budget:
                state["train_s"] += time.perf_counter() - state["t0"]
                evaluate(n)
                state["t0"] = time.perf_counter()
            return True

    evaluate(0)
    state["t0"] = time.perf_counter()
    model.learn(agent_budget, callback=EvalEvery())
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += (agent_budget - state["reported"]) * repeat
    env.close()
    eval_env.close()
    return str(path)


def time_tdmpc(
    env_id: str, preset: str, overrides: dict[str, Any], steps: int, repeat: int
) -> dict[str, Any]:
    """CPU and wall seconds per agent step of TD-MPC in its steady state (full horizon, learning)."""
    import torch as th

    th.set_num_threads(1)
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_tdmpc import TDMPC

    kwargs, _ = algo_settings("tdmpc", env_id, preset, overrides)
    # Skip the seed phase's cost: a short random phase, no seed updates, the full planning horizon.
    seed_steps = max(500, 2 * kwargs.get("batch_size", 512))
    kwargs.update(learning_starts=seed_steps, seed_updates=0, horizon_warmup_steps=1)
    env_kwargs = {"action_repeat": repeat} if is_metaworld(env_id) else None
    model = TDMPC(
        "MlpPolicy", make_vec_env(env_id, n_envs=1, seed=0, env_kwargs=env_kwargs), seed=0, **kwargs
    )
    model.learn(seed_steps + 10)  # seed phase and warm-up of the first updates
    cpu, wall = time.process_time(), time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
    env = make_vec_env(env_id, n_envs=1, seed=1, env_kwargs=env_kwargs)
    obs, state = env.reset(), None
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        action, state = model.predict(obs, state=state, deterministic=True)
        obs, *_ = env.step(action)
    plan_cpu, plan_wall = time.process_time() - cpu, time.perf_counter() - wall
    return dict(
        env=env_id,
        preset=preset,
        steps=steps,
        train_cpu_s_per_step=round(train_cpu / steps, 4),
        train_wall_s_per_step=round(train_wall / steps, 4),
        plan_cpu_s_per_step=round(plan_cpu / steps, 4),
        plan_wall_s_per_step=round(plan_wall / steps, 4),
    )


# ----------------------------------------------------------------------------- results


def read_rows(out: Path, env_id: str) -> list[dict[str, Any]]:
    """Rows of every run CSV under ``out`` (its runs/ and the runs/ of its subfolders).

    Runs of one environment launched by separate invocations (``--out <folder>/<part>``) are merged;
    a run (algo, seed) found twice keeps the file that got furthest.
    """
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for path in sorted(out.glob(f"**/runs/*_{env_id}_seed*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            for key in ("seed", "env_steps", "agent_steps"):
                row[key] = int(row[key])
            for key in ("success", "return", "wall_s"):
                row[key] = float(row[key])
        if rows and len(rows) > len(runs.get((rows[0]["algo"], rows[0]["seed"]), [])):
            runs[(rows[0]["algo"], rows[0]["seed"])] = rows
    return [row for key in sorted(runs) for row in runs[key]]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def load_reference(env_id: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Published curves of a Meta-World task: per algo, simulator steps and mean/min/max success."""
    task = env_id.rsplit("-v", 1)[0]
    curves = {}
    for algo in REFERENCE_ALGOS:
        for base in REFERENCE_DIRS:
            path = base / "curves" / algo / f"mw-{task}.csv"
            if path.exists():
                break
        else:
            continue
        with open(path, newline="") as f:
            data = [(int(float(r["step"])), float(r["success"])) for r in csv.DictReader(f)]
        by_step: dict[int, list[float]] = {}
        for step, success in data:
            by_step.setdefault(step, []).append(success)
        steps = np.array(sorted(by_step))
        values = [by_step[s] for s in steps]
        curves[algo] = (
            steps * REFERENCE_ACTION_REPEAT,
            np.array([np.mean(v) for v in values]),
            np.array([np.min(v) for v in values]),
            np.array([np.max(v) for v in values]),
        )
    return curves


def summarise(rows: list[dict[str, Any]], metric: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Per algo: env steps reached by every seed, and mean/min/max over seeds."""
    out = {}
    order = ["tdmpc", "sac", "tqc"]
    algos = sorted(
        dict.fromkeys(r["algo"] for r in rows), key=lambda a: (order.index(a) if a in order else 9, a)
    )
    for algo in algos:
        runs: dict[int, dict[int, float]] = {}
        for r in rows:
            if r["algo"] == algo:
                runs.setdefault(r["seed"], {})[r["env_steps"]] = r[metric]
        common = sorted(set.intersection(*(set(v) for v in runs.values())))
        values = np.array([[runs[s][x] for s in runs] for x in common])
        if len(common):
            out[algo] = (np.array(common), values.mean(1), values.min(1), values.max(1), len(runs))
    return out


def plot(rows: list[dict[str, Any]], env_id: str, path: Path, reference: bool, repeat: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metaworld = not all(math.isnan(r["success"]) for r in rows)
    metric = "success" if metaworld else "return"
    ref = load_reference(env_id) if reference and metaworld else {}
    fig, axes = plt.subplots(1, 2 if ref else 1, figsize=(12 if ref else 6.5, 4.2), squeeze=False)
    colors = {"tdmpc": "C0", "sac": "C1", "tqc": "C2"}
    names = {"tdmpc": "TD-MPC (sb3_tdmpc)", "sac": "SAC (SB3)", "tqc": "TQC (sb3-contrib)"}
    ref_colors = {"tdmpc": "C0", "sac": "C1", "tdmpc2": "C3", "dreamerv3": "C4"}
    for ax_i, ax in enumerate(axes[0]):
        for algo, (x, mean, lo, hi, n) in summarise(rows, metric).items():
            color = colors.get(algo, "C5")
            ax.plot(
                x,
                mean,
                color=color,
                marker=".",
                label=f"{names.get(algo, algo)}, {n} seed{'s' if n > 1 else ''}",
            )
            ax.fill_between(x, lo, hi, color=color, alpha=0.2)
        if ax_i == 1:
            for algo, (x, mean, lo, hi) in ref.items():
                keep = x > 0
                ax.plot(x[keep], mean[keep], "--", color=ref_colors[algo], label=REFERENCE_ALGOS[algo])
                ax.fill_between(x[keep], lo[keep], hi[keep], color=ref_colors[algo], alpha=0.08)
            ax.set_xscale("log")
            ax.set_title("with published curves (3 seeds, v2 tasks), log scale")
        else:
            ax.set_title(f"{env_id}: mean over seeds, min-max shaded")
        ax.set_xlabel(f"simulator steps (action repeat {repeat})" if metaworld else "environment steps")
        ax.set_ylabel(
            "success rate (deterministic eval)" if metaworld else "mean return (deterministic eval)"
        )
        if metaworld:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per evaluation step, each algo's mean [min, max] over seeds and train time."""
    metaworld = not all(math.isnan(r["success"]) for r in rows)
    metric = "success" if metaworld else "return"
    stats = summarise(rows, metric)
    steps = sorted({int(x) for x, *_ in stats.values() for x in x})
    fmt = "{:.2f}" if metaworld else "{:.0f}"
    head = ["simulator steps", "agent steps"] + [
        f"{a} {metric} (n={v[4]}), mean [min, max]" for a, v in stats.items()
    ]
    head += [f"{a} train wall_s (mean)" for a in stats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    agent = {r["env_steps"]: r["agent_steps"] for r in rows}
    for step in steps:
        cells = [str(step), str(agent[step])]
        for x, mean, lo, hi, _n in stats.values():
            i = np.flatnonzero(x == step)
            cells.append(
                f"{fmt.format(mean[i[0]])} [{fmt.format(lo[i[0]])}, {fmt.format(hi[i[0]])}]" if len(i) else ""
            )
        for algo, (x, *_rest) in stats.items():
            walls = [r["wall_s"] for r in rows if r["algo"] == algo and r["env_steps"] == step]
            cells.append(f"{np.mean(walls):.0f}" if step in x and walls else "")
        lines.append("| " + " | ".join(cells) + " |")
    reached = {}
    for r in rows:
        key = (r["algo"], r["seed"])
        reached[key] = max(reached.get(key, 0), r["env_steps"])
    lines.append("")
    lines.append(
        "Simulator steps reached per run: "
        + ", ".join(f"{a} seed {s}: {n}" for (a, s), n in sorted(reached.items()))
    )
    table = "\n".join(lines)
    print(table)
    return table


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", default="Pendulum-v1", help="gymnasium id (Meta-World ids: reach-v3, ...)")
    parser.add_argument("--algos", nargs="+", default=None, help="tdmpc sac tqc (default: all installed)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=10_000, help="budget in simulator steps")
    parser.add_argument("--eval-freq", type=int, default=1000, help="evaluate every N simulator steps")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--action-repeat", type=int, default=None, help="Meta-World only (default: 2)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="TD-MPC settings")
    parser.add_argument("--tdmpc-params", nargs="*", help="TD-MPC overrides key:value")
    parser.add_argument("--sac-params", nargs="*", help="SAC overrides key:value")
    parser.add_argument("--tqc-params", nargs="*", help="TQC overrides key:value")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    parser.add_argument("--reference", action="store_true", help="draw the published Meta-World curves")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default benchmarks/results/<env>)"
    )
    parser.add_argument("--plot-only", action="store_true", help="merge the run CSVs in --out and plot")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="N",
        help="only measure TD-MPC's cost per agent step (N learning steps, then N planning-only steps)",
    )
    args = parser.parse_args(argv)

    env_id = args.env
    out = args.out or ROOT / "benchmarks" / "results" / env_id
    out.mkdir(parents=True, exist_ok=True)
    metaworld = is_metaworld(env_id)
    repeat = action_repeat_of(env_id, args.action_repeat)
    if args.algos is None:
        args.algos = ["tdmpc", "sac"]
        try:
            import sb3_contrib  # noqa: F401

            args.algos.append("tqc")
        except ImportError:
            pass

    if args.timing:
        result = time_tdmpc(env_id, args.preset, _parse_overrides(args.tdmpc_params), args.timing, repeat)
        path = out / "timing.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result))
            if new:
                writer.writeheader()
            writer.writerow(result)
        print(result)
        return

    if not args.plot_only:
        if args.env_steps % repeat or args.eval_freq % repeat:
            raise SystemExit(f"--env-steps and --eval-freq must be multiples of the action repeat ({repeat})")
        overrides = {
            "tdmpc": _parse_overrides(args.tdmpc_params),
            "sac": _parse_overrides(args.sac_params),
            "tqc": _parse_overrides(args.tqc_params),
        }
        jobs = []
        print(
            f"{env_id}: {args.env_steps} simulator steps = {args.env_steps // repeat} agent steps "
            f"(action repeat {repeat}), eval every {args.eval_freq} simulator steps, "
            f"{args.eval_episodes} episodes, seeds {args.seeds}"
        )
        for algo in args.algos:
            kwargs, source = algo_settings(algo, env_id, args.preset, overrides.get(algo, {}))
            print(f"  {algo}: {source}: {kwargs}")
            for seed in args.seeds:
                jobs.append(
                    dict(
                        algo=algo,
                        env=env_id,
                        seed=seed,
                        action_repeat=repeat,
                        metaworld=metaworld,
                        env_steps=args.env_steps,
                        eval_freq=args.eval_freq,
                        eval_episodes=args.eval_episodes,
                        kwargs=kwargs,
                        csv=str(out / "runs" / f"{algo}_{env_id}_seed{seed}.csv"),
                    )
                )
        ctx = get_context("spawn")
        counter = ctx.Value("q", 0)
        total = args.env_steps * len(jobs)
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        bar = tqdm(
            total=total,
            unit="sim step",
            disable=args.no_progress,
            dynamic_ncols=True,
            mininterval=1.0 if interactive else 30.0,
        )
        if args.jobs > 1:
            pool = ProcessPoolExecutor(
                args.jobs, mp_context=ctx, initializer=_init_worker, initargs=(counter,)
            )
        else:  # one run at a time: in this process (a thread, so that the bar keeps moving)
            _init_worker(counter)
            pool = ThreadPoolExecutor(1)
        with pool:
            futures = [pool.submit(run_one, job) for job in jobs]
            while not all(f.done() for f in futures):
                time.sleep(1.0 if interactive else 30.0)
                bar.n = min(counter.value, total)
                bar.set_postfix(done=f"{sum(f.done() for f in futures)}/{len(jobs)} runs", refresh=False)
                bar.refresh()
            bar.n = min(counter.value, total)
            bar.close()
            for f in futures:
                f.result()  # raise a run's error

    rows = read_rows(out, env_id)
    if not rows:
        raise SystemExit(f"no results in {out / 'runs'}")
    csv_path, png_path = out / f"{env_id}.csv", out / f"{env_id}.png"
    write_csv(rows, csv_path)
    plot(rows, env_id, png_path, args.reference, repeat)
    (out / f"{env_id}.md").write_text(print_summary(rows) + "\n")
    print(f"wrote {csv_path}, {png_path} and {out / f'{env_id}.md'}")


if __name__ == "__main__":
    sys.exit(main())
