"""
Speed of TD-MPC at the paper's settings against this machine's arithmetic floor.

Measures, at the paper settings (obs 39, action 4, latent 50, MLP 512, batch 512, 6 planner
iterations x 512 samples + 25 policy trajectories, 64 elites) on Meta-World ``reach-v3``:

* one planning call (``TDMPCPolicy.plan``) and one update (world model + policy prior step), each
  as median/min/max over ``--repeats`` calls, against the floor ``reference GFLOP / matmul GFLOP/s``:
  the reference GFLOP are counted with ``FlopCounterMode`` on the plain reference implementation
  of ``tests/test_equivalence.py`` (25.35 per plan and 35.29 per update at horizon 5), and the
  matmul throughput is that of a 536x512 @ 512x512 fp32 matmul measured right before and after
  each timed call (so that the ratio holds under a varying machine load);
* ``sample_sequences(512, H)`` and ``update_priorities`` on a full 1M-transition buffer;
* the training loop (collect + plan + update) in agent steps per second, with the share of each;
* the peak memory (RSS) of the whole process, which holds the full 1M-transition buffer.

Plain Python, no pytest. Run from the repository root:

    python benchmarks/speed.py [--horizon 5 1] [--repeats 20] [--loop-steps 30] [--json out.json]
                               [--device cuda] [--compile]

Threads: torch's default, which SB3 keeps (``torch.get_num_threads()``; 2 on a 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from torch.utils.flop_counter import FlopCounterMode

import sb3_tdmpc  # noqa: F401  (registers reach-v3)
from sb3_tdmpc import TDMPC
from sb3_tdmpc.common.buffers import SequenceSamples

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "reach-v3"
OBS_DIM, ACTION_DIM, BATCH = 39, 4, 512
MATMUL_SHAPE = (536, 512, 512)  # (M, K, N)
MATMUL_FLOP = 2 * MATMUL_SHAPE[0] * MATMUL_SHAPE[1] * MATMUL_SHAPE[2]
# The counts for the straightforward implementation at horizon 5.
REFERENCE_GFLOP_H5 = {"plan": 25.35, "update": 35.29}


def load_reference() -> Any:
    """The plain reference implementation that tests/test_equivalence.py checks the fast paths against."""
    path = ROOT / "tests" / "test_equivalence.py"
    spec = importlib.util.spec_from_file_location("tdmpc_reference", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class Timer:
    """
    Wall-clock timing that waits for the device; or, with ``cpu_clock``, the process's CPU time, which
    a busy shared machine disturbs much less (meaningful with one thread: OpenMP threads spin).
    """

    def __init__(self, device: th.device, cpu_clock: bool = False):
        self.cuda = device.type == "cuda"
        self.clock = time.process_time if cpu_clock else time.perf_counter

    def now(self) -> float:
        if self.cuda:
            th.cuda.synchronize()
        return self.clock()

    def time(self, fn: Callable[[], Any]) -> float:
        start = self.now()
        fn()
        return self.now() - start


def matmul_gflops(timer: Timer, device: th.device, calls: int = 10) -> float:
    """Throughput (GFLOP/s) of the 536x512 @ 512x512 fp32 matmul: the median of ``calls`` calls."""
    m, k, n = MATMUL_SHAPE
    a, b = th.randn(m, k, device=device), th.randn(k, n, device=device)
    times = [timer.time(lambda: th.mm(a, b)) for _ in range(calls)]
    return MATMUL_FLOP / statistics.median(times) / 1e9


def make_batch(horizon: int, device: th.device, batch: int = BATCH) -> SequenceSamples:
    gen = th.Generator().manual_seed(0)
    masks = th.ones(horizon, batch, 1)
    masks[horizon // 2 :, :8] = 0
    return SequenceSamples(
        observations=th.randn(horizon + 1, batch, OBS_DIM, generator=gen).to(device),
        actions=(th.rand(horizon, batch, ACTION_DIM, generator=gen) * 2 - 1).to(device),
        rewards=th.randn(horizon, batch, 1, generator=gen).to(device),
        terminals=th.zeros(horizon, batch, 1, device=device),
        masks=masks.to(device),
        weights=(th.rand(batch, generator=gen) * 0.5 + 0.5).to(device),
        indices=np.arange(batch),
    )


def make_model(horizon: int, device: str, buffer_size: int, compile_model: bool) -> TDMPC:
    policy_kwargs = {"torch_compile": True} if compile_model else None
    return TDMPC(
        ENV_ID,
        horizon=horizon,
        buffer_size=buffer_size,
        learning_starts=0,
        seed_updates=0,
        horizon_warmup_steps=1,
        exploration_decay_steps=1,
        device=device,
        seed=0,
        policy_kwargs=policy_kwargs,
    )


def fill_buffer(model: TDMPC, episode_length: int = 250) -> None:
    """A full replay buffer of synthetic transitions (episodes of 250 steps) with random priorities."""
    rb, rng = model.replay_buffer, np.random.default_rng(0)
    for start in range(0, rb.buffer_size, 65536):  # in chunks: no large temporaries in the peak RSS
        rows = slice(start, min(start + 65536, rb.buffer_size))
        shape = (rows.stop - rows.start, rb.n_envs)
        rb.observations[rows] = rng.standard_normal((*shape, OBS_DIM), dtype=np.float32)
        rb.next_observations[rows] = rng.standard_normal((*shape, OBS_DIM), dtype=np.float32)
        rb.actions[rows] = rng.uniform(-1, 1, (*shape, ACTION_DIM))
        rb.rewards[rows] = rng.random(shape, dtype=np.float32)
        ends = (np.arange(rows.start, rows.stop) % episode_length == episode_length - 1)[:, None]
        rb.dones[rows] = ends
        rb.timeouts[rows] = ends
    rb.pos, rb.full = 0, True
    rb.tree.update(np.arange(rb.buffer_size * rb.n_envs), rng.random(rb.buffer_size * rb.n_envs) + 0.01)


def counted_gflop(fn: Callable[[], Any]) -> float:
    # Eager: the same FLOPs, and a compiled function run under the counter's dispatch mode would
    # afterwards stay eager.
    with th.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def summary(times: list[float]) -> dict[str, float]:
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def runnable_tasks() -> int:
    """Tasks running or waiting for a CPU right now (Linux ``/proc/loadavg``), this process included."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0


def wait_quiet(max_seconds: float) -> bool:
    """
    Wait (at most ``max_seconds``) for a moment when no other task wants this machine's CPUs, so that
    on a shared machine each timed call runs in a quiet window. :return: whether it was quiet
    """
    deadline = time.monotonic() + max_seconds
    while runnable_tasks() > 2:  # this process, and the one reading /proc
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def time_against_floor(
    fn: Callable[[], Any],
    reference_gflop: float,
    repeats: int,
    timer: Timer,
    device: th.device,
    max_wait: float = 0.0,
) -> dict[str, Any]:
    """Time ``fn``, each call between two matmul throughput measurements; ratio = time / floor."""
    fn()
    fn()  # warm-up (allocator, lazy init, compilation)
    times, ratios, gflops, quiet = [], [], [], 0
    for _ in range(repeats):
        quiet += wait_quiet(max_wait) if max_wait > 0 else 0
        before = matmul_gflops(timer, device)
        seconds = timer.time(fn)
        after = matmul_gflops(timer, device)
        throughput = (before + after) / 2
        times.append(seconds)
        gflops.append(throughput)
        ratios.append(seconds / (reference_gflop / throughput))
    return {
        **summary(times),
        "matmul_gflops_median": statistics.median(gflops),
        "matmul_gflops_max": max(gflops),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "quiet_calls": quiet,
    }


def plan_and_update(
    model: TDMPC, horizon: int, obs: th.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """One planning call and one update of ``model`` at ``horizon``, as timed."""
    policy = model.policy
    policy.planning_horizon, policy.std_floor = horizon, model.exploration_final_std
    model.replay_buffer.update_priorities = lambda indices, priorities: None  # the update's own cost only
    data = make_batch(horizon, obs.device)

    def plan() -> None:
        with th.inference_mode():
            policy.plan(obs, None, explore=True)

    def update() -> None:
        _, latents = model._update_world_model(data)
        model._update_policy_prior(latents, data.masks)

    return plan, update


def bench_horizon(
    horizon: int,
    args: argparse.Namespace,
    reference: Any,
    timer: Timer,
    device: th.device,
    model: TDMPC,
    to_profile: list[tuple[dict[str, Any], Callable[[], Any]]],
) -> dict[str, Any]:
    """Plan and update at ``horizon`` (planning horizon and training sequence length)."""
    if model.horizon != horizon:
        model = make_model(horizon, args.device, 1_000, args.compile)
    obs = th.randn(args.n_envs, OBS_DIM, device=device)
    plan, update = plan_and_update(model, horizon, obs)

    # The floor counts the plain reference on CPU (same shapes; FLOPs do not depend on the device).
    ref_model = make_model(horizon, "cpu", 1_000, False)
    ref_model.policy.planning_horizon = horizon
    ref_obs, ref_data = obs.cpu(), make_batch(horizon, th.device("cpu"))

    def reference_plan() -> None:
        with th.no_grad():
            reference.reference_plan(ref_model.policy, ref_obs)

    def reference_update() -> None:
        reference.reference_update(ref_model, ref_data)

    result: dict[str, Any] = {"horizon": horizon}
    for name, fn, ref_fn in (("plan", plan, reference_plan), ("update", update, reference_update)):
        reference_gflop = counted_gflop(ref_fn)
        result[name] = {
            "reference_gflop": reference_gflop,
            "gflop": counted_gflop(fn),
            **time_against_floor(fn, reference_gflop, args.repeats, timer, device, args.wait_quiet),
        }
        to_profile.append((result[name], fn))
    return result


@contextlib.contextmanager
def kernel_profile() -> Any:
    """
    Everything compiled anew with Inductor's kernels (and the ATen calls of its C++ wrapper) as
    profiler events of their own. The instrumentation costs time, so the timed calls run before it.
    """
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        yield
    torch._dynamo.reset()


# Profile categories: ATen op name -> where the time goes.
CATEGORIES = {
    "matmul (mm, addmm, bmm, mv)": (
        "mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "matmul", "linear", "sb3_tdmpc_cpu::mm",
    ),
    "matmul and ELU in one kernel (sb3_tdmpc's linear_elu)": ("sb3_tdmpc_cpu::linear_elu",),
    "ELU (exp, clamp, maximum, sub) and its backward": (
        "exp", "exp_", "clamp", "clamp_", "clamp_min", "clamp_max", "maximum", "sub_", "elu", "elu_backward",
        "sb3_tdmpc_cpu::elu_backward_bias_grad",
    ),
    "LayerNorm, tanh/sigmoid and their backward": (
        "native_layer_norm", "native_layer_norm_backward", "sigmoid", "sigmoid_", "tanh", "tanh_backward",
        "sb3_tdmpc_cpu::layer_norm_tanh", "sb3_tdmpc_cpu::layer_norm_tanh_",
        "sb3_tdmpc_cpu::layer_norm_tanh_backward", "sb3_tdmpc_cpu::first_layer_norm_tanh_",
    ),
    # their GEMMs count as matmul above: the rest of their time on the calling thread (bias, ELU,
    # LayerNorm-tanh, and the wait for the other thread)
    "each thread through a whole chain, elementwise (sb3_tdmpc's rollout_return, min_q_of_policy)": (
        "sb3_tdmpc_cpu::rollout_return", "sb3_tdmpc_cpu::min_q_of_policy",
    ),
    "copies, cat, stack": ("copy_", "cat", "stack", "clone", "contiguous", "_to_copy"),
    "optimizer (fused Adam), grad norm": (
        "_fused_adam_", "_foreach_norm", "_foreach_mul_", "linalg_vector_norm",
    ),
}  # fmt: skip


COMPILED = "torch.compile's fused kernels (elementwise)"


def profile(fn: Callable[[], Any], calls: int = 3) -> dict[str, float]:
    """Share of self CPU time per category (torch.profiler, wall time per op)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = dict.fromkeys([*CATEGORIES, COMPILED], 0.0)
    for event in events:
        # Compiled code (cpp_wrapper) calls ATen through AOTI shims: aoti_torch_cpu_addmm_out is addmm.
        name = event.key.removeprefix("aten::").removeprefix("aoti_torch_cpu_").removesuffix("_out")
        if "CompiledFxGraph" in event.key or "cpp_fused" in event.key:
            category = COMPILED
        else:
            category = next((c for c, ops in CATEGORIES.items() if name in ops), "other ops and Python")
        shares[category] = shares.get(category, 0.0) + event.self_cpu_time_total / total
    shares["other ops and Python"] = 1.0 - sum(v for k, v in shares.items() if k != "other ops and Python")
    return shares


def bench_buffer(model: TDMPC, horizon: int, repeats: int) -> dict[str, Any]:
    rb = model.replay_buffer
    rb_update = type(rb).update_priorities.__get__(rb)
    samples = rb.sample_sequences(BATCH, horizon)
    priorities = np.random.default_rng(1).random(BATCH) * 2
    sample_times, update_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = rb.sample_sequences(BATCH, horizon)
        sample_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        rb_update(samples.indices, priorities)
        update_times.append(time.perf_counter() - start)
    return {
        "transitions": rb.buffer_size * rb.n_envs,
        "sample_sequences": summary(sample_times),
        "update_priorities": summary(update_times),
    }


@contextlib.contextmanager
def timed(obj: Any, name: str, totals: dict[str, float], key: str, timer: Timer):
    """Accumulate the time spent in ``obj.name`` into ``totals[key]`` while the context is open."""
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = timer.now()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += timer.now() - start

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name) if name in vars(obj) else None


def bench_loop(model: TDMPC, steps: int, timer: Timer) -> dict[str, Any]:
    """learn() on reach-v3 from a full buffer, one update per step, at the full planning horizon."""
    model.learn(3)  # warm-up: envs, first plans and updates
    totals = {"plan": 0.0, "sample": 0.0, "update": 0.0}
    with (
        timed(model.policy, "plan", totals, "plan", timer),
        timed(model.replay_buffer, "sample_sequences", totals, "sample", timer),
        timed(model, "train", totals, "update", timer),
    ):
        start = timer.now()
        model.learn(steps, reset_num_timesteps=False)
        seconds = timer.now() - start
    totals["update"] -= totals["sample"]  # train() includes the sampling
    shares = {key: value / seconds for key, value in totals.items()}
    shares["collect"] = 1.0 - sum(shares.values())
    return {
        "steps": steps,
        "planning_horizon": model.policy.planning_horizon,
        "steps_per_second": steps / seconds,
        "share": shares,
    }


def peak_memory() -> dict[str, float]:
    result = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if th.cuda.is_available():
        result["cuda_peak_mib"] = th.cuda.max_memory_allocated() / 2**20
    return result


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": th.__version__}
    info["threads"] = th.get_num_threads()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    if th.cuda.is_available():
        info["gpu"] = th.cuda.get_device_name()
    return info


def print_table(results: dict[str, Any]) -> None:
    info = results["machine"]
    mode = "torch.compile" if results["compile"] else "eager"
    print(
        f"# {results['date']}, {info.get('cpu', '')}, device {results['device']}, {info['threads']} threads, "
        f"{mode}, {results['clock']} clock, load average {' '.join(info.get('load_average', []))}"
    )
    print()
    print(
        "| what | H | median ms | min ms | max ms | GFLOP ref / ours | matmul GFLOP/s | floor ms | x floor "
        "| quiet calls |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results["horizons"]:
        for name in ("plan", "update"):
            r = row[name]
            floor = r["reference_gflop"] / r["matmul_gflops_median"] * 1e3
            times = f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f}"
            print(
                f"| {name} | {row['horizon']} | {times} | "
                f"{r['reference_gflop']:.2f} / {r['gflop']:.2f} | {r['matmul_gflops_median']:.0f} "
                f"(max {r['matmul_gflops_max']:.0f}) | {floor:.1f} | **{r['ratio_median']:.2f}** "
                f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['quiet_calls']}/{results['repeats']} |"
            )
    b = results["buffer"]
    for name in ("sample_sequences", "update_priorities"):
        r = b[name]
        label = f"{name}({BATCH}, {results['buffer_horizon']})" if name == "sample_sequences" else name
        print(
            f"| {label}, {b['transitions'] / 1e6:g}M | | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
            f"{r['max_ms']:.2f} | | | | | |"
        )
    print()
    loop = results["loop"]
    share = ", ".join(f"{key} {value:.0%}" for key, value in loop["share"].items())
    print(
        f"training loop on {ENV_ID} (planning horizon {loop['planning_horizon']}, 1 update per step): "
        f"**{loop['steps_per_second']:.2f} agent steps/s** ({share})"
    )
    peak = results["memory"]["peak_rss_mib"]
    print(
        f"peak memory (RSS, with the full {b['transitions'] / 1e6:g}M-transition buffer): **{peak:.0f} MiB**"
    )
    print_profile(results)


def print_profile(results: dict[str, Any]) -> None:
    if "profile" not in results["horizons"][0]["plan"]:
        return
    columns = [(row, name) for row in results["horizons"] for name in ("plan", "update")]
    print()
    print(
        "| where the time goes (self CPU time) | "
        + " | ".join(f"{n} H={r['horizon']}" for r, n in columns)
        + " |"
    )
    print("|---" * (1 + len(columns)) + "|")
    for category in results["horizons"][0]["plan"]["profile"]:
        shares = " | ".join(f"{r[n]['profile'].get(category, 0.0):.0%}" for r, n in columns)
        print(f"| {category} | {shares} |")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--horizon", type=int, nargs="+", default=[5, 1], help="horizons to measure")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--loop-steps", type=int, default=30, help="agent steps of the timed training loop")
    parser.add_argument("--buffer-size", type=int, default=1_000_000, help="replay buffer transitions")
    parser.add_argument("--n-envs", type=int, default=1, help="environments planned in one batch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as SB3)")
    parser.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time CPU time instead of wall time (with --threads 1, on a busy machine)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        help="before each timed call, wait up to this many seconds for no other runnable task (0: never)",
    )
    parser.add_argument("--compile", action="store_true", help="policy_kwargs=dict(torch_compile=True)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile plan and update (torch.profiler), after the timed calls",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--pixels", action="store_true", help="also time the pixel update (speed_pixels.py)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not th.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    if args.threads is not None:
        th.set_num_threads(args.threads)
    device, timer = th.device(args.device), Timer(th.device(args.device), args.cpu_clock)
    reference = load_reference()
    main_horizon = max(args.horizon)
    model = make_model(main_horizon, args.device, args.buffer_size, args.compile)
    fill_buffer(model)
    results: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "device": args.device,
        "compile": args.compile,
        "repeats": args.repeats,
        "clock": "CPU time" if args.cpu_clock else "wall",
        "buffer_horizon": main_horizon,
        "buffer": bench_buffer(model, main_horizon, max(args.repeats, 50)),
    }
    # The loop first: the peak memory is then that of a training run on a full 1M-transition buffer.
    results["loop"] = bench_loop(model, args.loop_steps, timer)
    results["memory"] = peak_memory()
    to_profile: list[tuple[dict[str, Any], Callable[[], Any]]] = []
    results["horizons"] = [
        bench_horizon(h, args, reference, timer, device, model, to_profile) for h in args.horizon
    ]
    if args.profile:
        with kernel_profile() if args.compile else contextlib.nullcontext():
            for result, fn in to_profile:
                result["profile"] = profile(fn)
    results["command"] = " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]])
    print_table(results)
    if args.pixels:  # CnnPolicy's update at the YAML's pixel settings against the state update
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import speed_pixels

        results["pixels"] = speed_pixels.measure(repeats=min(args.repeats, 5), device=args.device)
        speed_pixels.print_rows(results["pixels"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
