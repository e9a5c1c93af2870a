"""
Experiments behind docs/performance.md's "What was tried": ways to close the gap between the
planner and the matmul floor, kept (those that paid off and those that did not) so that anyone can
rerun them.

1. ``chain``: five (Linear 512->512, ELU, Linear 512->512, ELU) blocks on 537 rows, the shape of
   the planner's dynamics/reward layers, against the same ten matmuls alone (no bias, no ELU):
   eager (``addmm`` + the package's ELU in PyTorch ops; the package's fused CPU kernel,
   ``fast_layers.affine_elu``), and ``torch.compile``d with ``addmm`` (what the
   compiled planner does), with ``mm`` and the bias added in the ELU kernel (no bias copy before
   the GEMM), and with Inductor's C++ GEMM template (``max_autotune``, CPP backend; reachable for
   non-constant weights only through ``bmm``), which can fuse the ELU into the GEMM's epilogue.
2. ``buffer``: the sum tree's ``find`` (512 stratified draws) and ``update`` (512 leaves) on 1M
   leaves, as ``sample_sequences`` and ``update_priorities`` call them, against the per-level code
   they replaced on Nov 30 (two gathers and three guards per level; repeated parents dropped per
   level), with the same results.
3. ``plan`` and ``update`` at the paper settings (horizon 5), eager and ``torch_compile=True``,
   each against variants without one of the choices that ``TDMPCPolicy.compiled`` and ``policies``
   make on CPU: Inductor's ``cpp_wrapper`` (kernels launched from generated C++ instead of
   Python: a planner iteration runs about 100 kernels); FMA contraction in Inductor's kernels; the
   compiled-CPU layer shapes (bias in the fused kernel, one-output layers as reductions, matmuls
   whole rather than in 512-row blocks, polynomial exp, ELU backward from its output, the action's
   part of a first layer as fused terms, weight gradients in the weight's own layout, a one-output
   layer's weight gradient as a matmul), and, eager and compiled, the policy prior step's Q backward
   over only the rows that min(Q1, Q2)'s gradient reaches, a narrow layer's weight gradient computed
   with its narrow side as rows (then copied into the weight's layout), and Q's tanh as a rational
   function instead of Inductor's sigmoid;
   eager, the fused CPU kernels (``cpu_kernels``) switched back to PyTorch ops, all or one at a time,
   the chains layer by layer, the planner's policy prior trajectories step by step, and the per-thread
   kernels' rows split equally rather than by the threads' measured speeds.

4. ``matmuls`` (``--gemm-rounds``): the floor's matmul on operands in cache (as the floor is
   measured) and on operands read from memory; and every matmul of the compiled plan and update
   timed where it runs, full-width (every dimension >= 512) and narrow, against the floor.
5. ``policy step`` (``--policy-step-rounds``): the policy prior step alone (after an untimed
   world-model step) of the plan/update variants, in turn round after round: its Q backward
   (``fast_layers.FrozenQMember``) against autograd's and against one over all rows.
6. ``tall matmuls`` (``--tall-rounds``): the update's [2560 or 3072, 512] x [512, 512] matmuls (an
   input gradient over horizon x batch rows) by ATen (MKL's threads) and by the fused CPU kernels'
   per-thread row blocks (``cpu_kernels.mm``), interleaved with the floor's matmul.
7. ``eager update bound`` (``--eager-bound-rounds``): the eager update against its floor, every
   matmul of it (PyTorch's shapes: the fused kernels off) replayed back to back on fresh operands,
   and the update at batch 8, where what remains does not scale with the batch (Python's, autograd's
   and the dispatcher's cost per op; the optimizer steps and other parameter-sized work).
8. ``shared first layers`` (``--first-layer-rounds``): R's and both Q members' first layers, which
   read the same [horizon x batch, latent + action] input in the world-model step, as three narrow
   GEMMs (as the update runs them) against one on their weights side by side: forward, input
   gradient (three summed) and weight gradient, with what one GEMM would save against the update's floor.
9. ``first layers' weight gradients`` (``--weight-gradient-rounds``): the update's first layers' (encoder,
   d, R, pi; narrow inputs) weight gradients as ``grad^T x`` in the nn.Linear weight's layout and as
   ``x^T grad`` with the narrow side as rows, then copied into that layout (``fast_layers._weight_gradient``),
   and what the second saves per update against the update's floor.

Each variant of 1-3 is timed in turn, round after round (interleaved, so that a change of machine load
touches them all), and reported as the median ratio to the matmul floor measured in the same
round. Run from the repository root (compiling takes a few minutes the first time):

    python benchmarks/speed_experiments.py [--rounds 40] [--plan-rounds 15] [--skip-plan]
    python benchmarks/speed_experiments.py --skip-chain --variant default --variant "plain layers"
    python benchmarks/speed_experiments.py --skip-chain --variant =eager --variant "the default"
    python benchmarks/speed_experiments.py --skip-chain --skip-plan --buffer-rounds 300
    python benchmarks/speed_experiments.py --skip-chain --skip-plan --buffer-rounds 0 --gemm-rounds 20
    python benchmarks/speed_experiments.py --skip-chain --skip-plan --buffer-rounds 0 --gemm-rounds 0 \\
        --policy-step-rounds 40 --variant eager --variant "policy step" --variant default
    python benchmarks/speed_experiments.py --skip-chain --skip-plan --buffer-rounds 0 --gemm-rounds 0 \\
        --tall-rounds 40
    python benchmarks/speed_experiments.py --skip-chain --skip-plan --buffer-rounds 0 --gemm-rounds 0 \\
        --first-layer-rounds 40
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py: model, timer and floor of the speed benchmark)

from sb3_tdmpc.common import cpu_kernels, fast_layers  # noqa: E402
from sb3_tdmpc.common.buffers import SumTree  # noqa: E402
from sb3_tdmpc.common.fast_layers import elu_  # noqa: E402
from sb3_tdmpc.tdmpc import policies  # noqa: E402

ROWS, WIDTH, BLOCKS = 537, 512, 5
LATENT_DIM = 50  # the paper's (TDMPCPolicy's default)


def chain_variants() -> tuple[Callable[[], Any], dict[str, Callable[[], Any]]]:
    """The floor (matmuls alone) and the variants of the Linear-ELU chain, all on the same data."""
    gen = th.Generator().manual_seed(0)
    x = th.randn(ROWS, WIDTH, generator=gen)
    w1, w2 = (th.randn(WIDTH, WIDTH, generator=gen) / WIDTH**0.5 for _ in range(2))
    b1, b2 = (th.randn(WIDTH, generator=gen) for _ in range(2))
    w1_t, w2_t = w1.t().contiguous(), w2.t().contiguous()
    neg_b1, neg_b2 = -b1, -b2

    def matmuls_alone() -> th.Tensor:
        h = x
        for _ in range(BLOCKS):
            h = th.mm(th.mm(h, w1_t), w2_t)
        return h

    # The package's ELU: in place and eager, or functional and fused while compiling.
    def addmm_elu() -> th.Tensor:
        h = x
        for _ in range(BLOCKS):
            h = elu_(F.linear(elu_(F.linear(h, w1, b1)), w2, b2))
        return h

    def mm_then_bias_elu() -> th.Tensor:
        # `mm - (-b)`: Inductor rewrites `mm + b` back into addmm (post_grad's addmm pattern).
        h = x
        for _ in range(BLOCKS):
            h = elu_(th.mm(elu_(th.mm(h, w1_t) - neg_b1), w2_t) - neg_b2)
        return h

    def fused_kernel() -> th.Tensor:
        h = x
        for _ in range(BLOCKS):
            h = fast_layers.affine_elu(fast_layers.affine_elu(h, w1.t(), b1), w2.t(), b2)
        return h

    def bmm_elu() -> th.Tensor:
        h = x[None]
        for _ in range(BLOCKS):
            h = elu_(th.bmm(elu_(th.bmm(h, w1_t[None]) + b1), w2_t[None]) + b2)
        return h[0]

    variants = {
        "eager: addmm + ELU (PyTorch ops)": addmm_elu,
        "eager: fused CPU kernel (this package)": fused_kernel,
        "compiled: addmm + fused ELU": th.compile(addmm_elu, dynamic=False),
        "compiled: mm + fused bias-ELU": th.compile(mm_then_bias_elu, dynamic=False),
        "compiled: C++ GEMM template, ELU epilogue": th.compile(
            bmm_elu, dynamic=False, options={"max_autotune": True, "max_autotune_gemm_backends": "CPP"}
        ),
    }
    reference = addmm_elu()
    for name, fn in variants.items():
        error = (fn() - reference).abs().max().item()
        assert error < 1e-4, (name, error)
    return matmuls_alone, variants


def interleaved(
    floor: Callable[[], float], variants: dict[str, Callable[[], Any]], rounds: int, grad: bool = False
) -> None:
    """
    Time each variant once per round against ``floor()`` (seconds) measured in the same round, in an
    order shuffled every round (with the order fixed or reversed each round, the variants at its ends
    ran a few percent slower than the same code in the middle); "x first" is the median over rounds of
    each variant's time over the first variant's in the same round (paired: robust to the host's load
    drifting between rounds).
    """
    shuffle = random.Random(0).shuffle
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with contextlib.nullcontext() if grad else th.inference_mode():
        for fn in variants.values():
            fn()
            fn()
        for _ in range(rounds):
            order = list(variants.items())
            shuffle(order)
            for name, fn in order:
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                times[name].append(elapsed)
                ratios[name].append(elapsed / floor())
    first = times[next(iter(variants))]
    print("| variant | median ms | x floor (median) | x floor (min) | x first (paired median) |")
    print("|---|---|---|---|---|")
    for name in variants:
        paired = statistics.median(t / f for t, f in zip(times[name], first, strict=True))
        print(
            f"| {name} | {statistics.median(times[name]) * 1e3:.1f} | "
            f"**{statistics.median(ratios[name]):.2f}** | {min(ratios[name]):.2f} | {paired:.3f} |"
        )


def _find_two_gathers(tree: SumTree, prefix_sums: np.ndarray) -> np.ndarray:
    """``SumTree.find`` before Nov 30: two gathers and three guards per level."""
    u = np.clip(prefix_sums, 0.0, np.nextafter(tree.total, 0.0))
    nodes = np.ones(u.shape, dtype=np.int64)
    for _ in range(tree.depth):
        left, right = tree.nodes[2 * nodes], tree.nodes[2 * nodes + 1]
        go_right = ((u >= left) & (right > 0)) | (left <= 0)
        u = np.where(go_right, u - left, u)
        nodes = 2 * nodes + go_right
    return nodes - tree.n_leaves


def _update_dropping_repeats(tree: SumTree, leaf_indices: np.ndarray, values: np.ndarray) -> None:
    """``SumTree.update`` before Nov 30: repeated parents dropped at every level."""
    rev_unique, rev_first = np.unique(leaf_indices[::-1], return_index=True)
    nodes = rev_unique + tree.n_leaves
    tree.nodes[nodes] = values[::-1][rev_first]
    for _ in range(tree.depth):
        nodes = nodes >> 1
        nodes = nodes[np.concatenate(([True], nodes[1:] != nodes[:-1]))]
        tree.nodes[nodes] = tree.nodes[2 * nodes] + tree.nodes[2 * nodes + 1]


def buffer_experiment(rounds: int, leaves: int = 1_000_000, batch: int = 512) -> None:
    """Sum tree ``find`` and ``update`` against the code they replaced, interleaved, same results."""
    rng = np.random.default_rng(0)
    trees, priorities = [SumTree(leaves), SumTree(leaves)], rng.random(leaves) + 0.01
    for tree in trees:
        tree.update(np.arange(leaves), priorities)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args)
        times.setdefault(name, []).append(time.perf_counter() - start)
        return result

    for _ in range(rounds):
        u = (np.arange(batch) + rng.random(batch)) * (trees[0].total / batch)  # as sample_sequences
        found = timed("find (this package)", trees[0].find, u)
        assert np.array_equal(found, timed("find, before", _find_two_gathers, trees[0], u))
        indices, values = rng.integers(0, leaves, batch), rng.random(batch) * 2
        timed("update (this package)", trees[0].update, indices, values)
        timed("update, before", _update_dropping_repeats, trees[1], indices, values)
        assert np.array_equal(trees[0].nodes, trees[1].nodes)
    print("| variant | median ms | min ms |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.3f} | {min(values) * 1e3:.3f} |")


def _never(x: th.Tensor) -> bool:
    return False


# The compiled-CPU layer shapes of ``policies`` switched off: with ``compiling_for_cpu`` always
# false, every layer is traced as the straightforward ``addmm``/``addmv`` and ``exp`` (no ``affine``
# shapes, ``_exp``); ELU's backward from its output (``_ELU``, eager's too) and
# the policy prior step's frozen Q backward (``FrozenQMember``) stay.
PLAIN_LAYERS = {"compiling_for_cpu": _never}


def _all_rows(grad: th.Tensor) -> th.Tensor:
    return th.arange(len(grad))


# The policy prior's step with each Q member's backward over all rows, not only those that
# min(Q1, Q2)'s gradient reaches (``fast_layers.reached_rows``).
ALL_ROWS = {"reached_rows": _all_rows}


class _FrozenQMemberByAutograd:
    """``fast_layers.FrozenQMember`` by autograd: the backward over all rows, compiled by Inductor too."""

    @staticmethod
    def apply(
        z_product: th.Tensor, b1: th.Tensor, action: th.Tensor, w_a: th.Tensor, *weights: th.Tensor
    ) -> th.Tensor:
        norm_weight, norm_bias, w2, b2, w3, b3 = weights
        h = fast_layers.add_narrow_matmul(fast_layers.add_bias(z_product, b1), action, w_a)
        h = fast_layers.layer_norm_tanh(h, norm_weight, norm_bias)
        return fast_layers.affine(fast_layers.affine_elu(h, w2, b2), w3, b3)


# The policy prior step's Q by autograd (as before Nov 30's ``FrozenQMember``).
Q_BY_AUTOGRAD = {"FrozenQMember": _FrozenQMemberByAutograd}


class _RowDotByAutograd:
    """``fast_layers._RowDot`` with autograd's backward (Inductor: a column reduction for the weight)."""

    @staticmethod
    def apply(x: th.Tensor, w: th.Tensor) -> th.Tensor:
        return (x * w).sum(-1, keepdim=True)


COLUMN_REDUCTION = {"_RowDot": _RowDotByAutograd}


def _sigmoid_tanh(x: th.Tensor) -> th.Tensor:
    return th.sigmoid(x * 2.0) * 2.0 - 1.0


# tanh (Q's, after the LayerNorm) as Inductor's sigmoid, not the rational function (``_rational_tanh``).
SIGMOID_TANH = {"_rational_tanh": _sigmoid_tanh}

# Every Linear-ELU layer and Q's LayerNorm-tanh as PyTorch ops, not the fused CPU kernels.
NO_CPU_KERNELS = {"cpu_kernels_apply": _never}


def _patched_call(name: str, patches: dict[str, Any]) -> Callable[..., Any]:
    """``<name>`` (as imported) run with ``patches`` (e.g. the fused CPU kernels off)."""
    original = getattr(fast_layers, name, None) or getattr(policies, name)

    def call(*args: Any) -> Any:
        with patched(patches):
            return original(*args)

    return call


# Q's LayerNorm-tanh as PyTorch ops (ATen's layer_norm, then 2 sigmoid(2x) - 1), the Linear-ELU kernel kept.
NO_LAYER_NORM_TANH_KERNEL = {
    name: _patched_call(name, NO_CPU_KERNELS) for name in ("layer_norm_tanh", "first_layer_norm_tanh")
}

# The backward's ELU (with the bias gradient) and Q's LayerNorm-tanh by ATen's kernels, not the fused ones.
ATEN_BACKWARD_PASSES = {
    name: _patched_call(name, NO_CPU_KERNELS)
    for name in ("elu_backward_bias_grad", "layer_norm_tanh_backward")
}


def _first_layer_norm_tanh_by_addmm(*args: th.Tensor) -> Any:
    z_product, bias, action, w_a, norm_weight, norm_bias = args
    h = th.addmm(z_product + bias, action, w_a)
    return h, *cpu_kernels.layer_norm_tanh(h, norm_weight, norm_bias, fast_layers.LAYER_NORM_EPS)


# Q's first layer in the policy step as before 2990629: the bias added, the action's part by a K = 4
# addmm (which copies its input first), then the LayerNorm-tanh kernel; not one pass per row.
FIRST_LAYER_BY_ADDMM = {"first_layer_norm_tanh": _first_layer_norm_tanh_by_addmm}

# The backward's input gradients (``fast_layers.matmul``) by one ATen matmul (MKL's threads), not in
# row blocks.
UNBLOCKED_INPUT_GRADIENTS = {"matmul": th.mm}


class _LinearELUInRowBlocks:
    """``cpu_kernels`` with ``linear_elu`` over 1024 rows or more in 128-row blocks per thread."""

    def __getattr__(self, name: str) -> Any:
        return getattr(cpu_kernels, name)

    @staticmethod
    def linear_elu(x: th.Tensor, weight_t: th.Tensor, bias: th.Tensor) -> th.Tensor:
        return cpu_kernels.linear_elu(x, weight_t, bias, block_rows=128)


# The update's Linear-ELU layers in 128-row blocks per thread, each block's GEMM and ELU in L2, instead of
# one GEMM per thread over its rows (the default).
LINEAR_ELU_IN_ROW_BLOCKS = {"cpu_kernels": _LinearELUInRowBlocks()}


def _row_blocked_mm(x: th.Tensor, weight: th.Tensor) -> th.Tensor:
    return th.cat([th.mm(block, weight) for block in x.split(512)])


class _RowBlockedMatmul(th.autograd.Function):
    """``fast_layers._Matmul`` with the forward and the input gradient in 512-row blocks."""

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, weight_t: th.Tensor) -> th.Tensor:
        ctx.save_for_backward(x, weight_t)
        return _row_blocked_mm(x, weight_t)

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor | None, th.Tensor | None]:
        return fast_layers._matmul_backward(ctx.needs_input_grad, grad, *ctx.saved_tensors)


_MATMUL = fast_layers.matmul


def _row_blocked_matmul(x: th.Tensor, weight: th.Tensor) -> th.Tensor:
    if fast_layers.compiling_for_cpu(x) and x.shape[0] >= 1024:
        return _row_blocked_mm(x, weight)
    return _MATMUL(x, weight)


# The compiled update's matmuls over 1024 rows or more (forward and input gradient) in 512-row blocks,
# as until the commit that ran them whole (they measured faster on the AMD EPYC VM, slower on the Intel Xeon).
ROW_BLOCKED_MATMULS = {"_Matmul": _RowBlockedMatmul, "matmul": _row_blocked_matmul}


def _weight_gradient_in_own_layout(grad: th.Tensor, x: th.Tensor, weight_t: th.Tensor) -> th.Tensor:
    """A weight gradient as the product in the weight's own layout, whatever its shape (the old rule)."""
    column_major = weight_t.stride(0) < weight_t.stride(1)
    return th.mm(grad.t(), x).t() if column_major else th.mm(x.t(), grad)


# Every weight gradient in the weight's own layout, a first layer's as a [512, 54]-like product.
LAID_OUT_WEIGHT_GRADIENTS = {"_weight_gradient": _weight_gradient_in_own_layout}

# The planner's rollout and min Q(z, pi(z)) (and the TD targets') layer by layer, each layer's kernels
# over both threads, not each thread through the whole chain (``rollout_return``, ``min_q_of_policy``).
CHAINS_LAYER_BY_LAYER = {"chain_kernels_apply": _never}

# The planner's policy prior trajectories step by step (pi, then d and R, each layer's kernels over both
# threads; before the policy_rollout kernel), the other chains kept.
POLICY_TRAJECTORIES_STEP_BY_STEP = {"policy_rollout": _patched_call("policy_rollout", CHAINS_LAYER_BY_LAYER)}


class _KernelsWithEqualThreadShares:
    """``cpu_kernels`` whose calls split their rows equally between the threads (not by measured speed)."""

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(cpu_kernels, name)
        if name in ("load", "thread_shares") or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            cpu_kernels.thread_shares(balance=False)
            try:
                return attribute(*args, **kwargs)
            finally:
                cpu_kernels.thread_shares(balance=True)

        return call


# The per-thread kernels' rows split equally between the threads, not by their measured speeds.
EQUAL_THREAD_SHARES = {"cpu_kernels": _KernelsWithEqualThreadShares()}

COMPILE_OPTIONS = policies.compile_options(th.device("cpu"))

# (name, torch_compile, Inductor options replacing TDMPCPolicy.compiled's own (None: its own),
#  attributes of ``policies`` and ``fast_layers`` replaced while tracing and running)
COMPILE_SETTINGS = [
    ("eager", False, None, {}),
    ("eager, no fused CPU kernels", False, None, NO_CPU_KERNELS),
    ("eager, Q's LayerNorm-tanh by PyTorch ops", False, None, NO_LAYER_NORM_TANH_KERNEL),
    ("eager, input gradients by one matmul (no row blocks)", False, None, UNBLOCKED_INPUT_GRADIENTS),
    ("eager, Linear-ELU in 128-row blocks per thread", False, None, LINEAR_ELU_IN_ROW_BLOCKS),
    ("eager, ELU and LayerNorm-tanh backward passes by ATen", False, None, ATEN_BACKWARD_PASSES),
    ("eager, Q's first layer in the policy step by addmm", False, None, FIRST_LAYER_BY_ADDMM),
    ("eager, chains layer by layer (no per-thread chains)", False, None, CHAINS_LAYER_BY_LAYER),
    ("eager, policy trajectories step by step", False, None, POLICY_TRAJECTORIES_STEP_BY_STEP),
    ("eager, Q backward over all rows in the policy step", False, None, ALL_ROWS),
    ("eager, Q by autograd in the policy step", False, None, Q_BY_AUTOGRAD),
    ("eager, narrow layers' weight gradients as laid out", False, None, LAID_OUT_WEIGHT_GRADIENTS),
    ("eager, equal thread shares", False, None, EQUAL_THREAD_SHARES),
    ("compiled, cpp_wrapper=False", True, {**COMPILE_OPTIONS, "cpp_wrapper": False}, {}),
    (
        "compiled, no FMA contraction",
        True,
        {**COMPILE_OPTIONS, "cpp.enable_floating_point_contract_flag": "off"},
        {},
    ),
    (
        "compiled, plain layers (addmm, N=1 GEMMs, Sleef exp)",
        True,
        None,
        PLAIN_LAYERS,
    ),
    ("compiled, Q backward over all rows in the policy step", True, None, ALL_ROWS),
    ("compiled, Q by autograd in the policy step", True, None, Q_BY_AUTOGRAD),
    ("compiled, tanh as 2 sigmoid(2x) - 1", True, None, SIGMOID_TANH),
    ("compiled, matmuls over many rows in 512-row blocks", True, None, ROW_BLOCKED_MATMULS),
    ("compiled, one-output layers' weight gradient as a column reduction", True, None, COLUMN_REDUCTION),
    ("compiled, narrow layers' weight gradients as laid out", True, None, LAID_OUT_WEIGHT_GRADIENTS),
    ("compiled (cpp_wrapper=True on CPU, the default)", True, None, {}),
]


PATCHED_MODULES = (policies, fast_layers)  # the hot paths' functions look each other up in these


@contextlib.contextmanager
def patched(attributes: dict[str, Any]) -> Any:
    """
    ``policies`` and ``fast_layers`` with ``attributes`` replaced wherever they hold them (a function
    imported into ``policies`` is replaced in both), while tracing and running: torch.compile guards
    on them, and each replacement is one function object, so its guard holds from call to call.
    """
    originals = []
    for name, value in attributes.items():
        holders = [module for module in PATCHED_MODULES if hasattr(module, name)]
        if not holders:
            raise AttributeError(f"no patched module has {name!r}")
        for module in holders:
            originals.append((module, name, getattr(module, name)))
            setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(originals):
            setattr(module, name, value)


def compiled_model(torch_compile: bool, options: dict[str, Any] | None) -> Any:
    model = speed.make_model(5, "cpu", 1_000, torch_compile)
    model.replay_buffer.update_priorities = lambda indices, priorities: None  # the update's own cost
    policy = model.policy
    policy.planning_horizon, policy.std_floor = 5, model.exploration_final_std
    if options is not None:
        for name, fn in [
            ("policy_rollout", policy._policy_rollout),
            ("plan_iteration", policy._plan_iteration),
            ("world_model_loss", model._world_model_loss),
            ("policy_prior_loss", model._policy_prior_loss),
        ]:
            policy._compiled[name] = th.compile(fn, dynamic=False, options=options)
    return model


def _with_patches(fn: Callable[[], None], patches: dict[str, Any]) -> Callable[[], None]:
    def call() -> None:
        with patched(patches):
            fn()

    return call


def is_selected(name: str, selected: list[str] | None) -> bool:
    """Whether ``--variant`` selects ``name``: it contains one of ``selected``, or is one as ``=name``."""
    if not selected:
        return True
    return any(name == part[1:] if part.startswith("=") else part in name for part in selected)


def plan_and_update_variants(
    selected: list[str] | None = None,
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any]]]:
    """
    Plan and update of each of COMPILE_SETTINGS (those whose name contains one of ``selected``). The
    eager variants share one model: different models (the same code, other buffers) differ by a few
    percent in a run, as much as some of the variants.
    """
    obs = th.randn(1, speed.OBS_DIM)
    plans, updates = {}, {}
    eager: tuple[Callable[[], Any], Callable[[], Any]] | None = None
    for name, torch_compile, options, patches in COMPILE_SETTINGS:
        if not is_selected(name, selected):
            continue
        if torch_compile:
            plan, update = speed.plan_and_update(compiled_model(torch_compile, options), 5, obs)
        else:
            eager = eager or speed.plan_and_update(compiled_model(False, None), 5, obs)
            plan, update = eager
        plans[name], updates[name] = _with_patches(plan, patches), _with_patches(update, patches)
    return plans, updates


def floor_matmul_hot_and_cold(rounds: int, pool_bytes: float = 256e6) -> None:
    """
    The floor's matmul (speed.MATMUL_SHAPE) on one pair of operands, called again and again (as
    ``speed.matmul_gflops`` measures it: the operands stay in cache), and on pairs taken in turn from a
    pool larger than the L3 cache, so that every call reads its operands from memory, as a matmul of
    the update does with the activations of the layer before.
    """
    m, k, n = speed.MATMUL_SHAPE
    pairs = int(pool_bytes // (4 * (m * k + k * n)))
    pool = [(th.randn(m, k), th.randn(k, n)) for _ in range(pairs)]
    times: dict[str, list[float]] = {"hot": [], "cold": []}
    for round_index in range(rounds):
        a, b = pool[0]
        for _ in range(3):
            th.mm(a, b)
        start = time.perf_counter()
        for _ in range(10):
            th.mm(a, b)
        times["hot"].append((time.perf_counter() - start) / 10)
        start = time.perf_counter()
        for i in range(10):
            th.mm(*pool[(10 * round_index + i) % pairs])
        times["cold"].append((time.perf_counter() - start) / 10)
    hot = speed.MATMUL_FLOP / statistics.median(times["hot"]) / 1e9
    cold = speed.MATMUL_FLOP / statistics.median(times["cold"]) / 1e9
    print("| operands | matmul GFLOP/s (median) | x hot |\n|---|---|---|")
    print(f"| hot (the floor's) | {hot:.0f} | 1.00 |")
    print(f"| cold ({pairs} pairs, {pool_bytes / 1e6:.0f} MB) | {cold:.0f} | {cold / hot:.2f} |")


def tall_matmuls(rounds: int) -> None:
    """ATen's matmul against the kernels' per-thread row blocks on the update's tall shapes (see 6.)."""
    if not cpu_kernels.load():
        print("the fused CPU kernels could not be built here")
        return
    m, k, n = speed.MATMUL_SHAPE
    floor_a, floor_b = th.randn(m, k), th.randn(k, n)
    row_major, column_major = th.randn(512, 512), th.randn(512, 512).t()  # Q's [in, out]; an nn.Linear's
    cases: dict[str, tuple[Callable[[], Any], int]] = {
        "floor (536 x 512 x 512)": (lambda: th.mm(floor_a, floor_b), m)
    }
    for rows in (2560, 3072):
        x = th.randn(rows, 512)
        for layout, weight in (("row-major", row_major), ("column-major", column_major)):
            for how, mm in (("ATen", th.mm), ("row blocks", cpu_kernels.mm)):
                cases[f"{rows} rows, {layout} weight, {how}"] = (lambda mm=mm, x=x, w=weight: mm(x, w), rows)
    gflops: dict[str, list[float]] = {name: [] for name in cases}
    for fn, _ in cases.values():
        fn()
    for _ in range(rounds):
        for name, (fn, rows) in cases.items():
            start = time.perf_counter()
            fn()
            gflops[name].append(2 * rows * k * n / (time.perf_counter() - start) / 1e9)
    floor = statistics.median(gflops["floor (536 x 512 x 512)"])
    print("| matmul | GFLOP/s (median) | x the floor's |\n|---|---|---|")
    for name, values in gflops.items():
        print(f"| {name} | {statistics.median(values):.0f} | {statistics.median(values) / floor:.2f} |")


def shared_first_layers(rounds: int) -> None:
    """R's and Q's first layers over one input as three GEMMs (the update's) and as one (see 8.)."""
    m, k, n = speed.MATMUL_SHAPE
    floor_a, floor_b = th.randn(m, k), th.randn(k, n)
    rows, width, layers = 5 * speed.BATCH, WIDTH, 3
    x = th.randn(rows, LATENT_DIM + speed.ACTION_DIM)
    weights = [th.randn(x.shape[1], width) for _ in range(layers)]
    grads = [th.randn(rows, width) for _ in range(layers)]
    weight, grad = th.cat(weights, dim=1), th.cat(grads, dim=1)
    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "forward": (lambda: [x @ w for w in weights], lambda: x @ weight),
        "input gradient": (
            lambda: sum(g @ w.t() for g, w in zip(grads, weights, strict=True)),
            lambda: grad @ weight.t(),
        ),
        "weight gradient": (lambda: [x.t() @ g for g in grads], lambda: x.t() @ grad),
    }
    times: dict[tuple[str, int], list[float]] = {(name, i): [] for name in cases for i in (0, 1)}
    for fns in cases.values():
        for fn in fns:
            fn()
    floor_gflops = []
    for _ in range(rounds):
        start = time.perf_counter()
        th.mm(floor_a, floor_b)
        floor_gflops.append(speed.MATMUL_FLOP / (time.perf_counter() - start) / 1e9)
        for name, fns in cases.items():
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[name, i].append(time.perf_counter() - start)
    update_floor_ms = speed.REFERENCE_GFLOP_H5["update"] / statistics.median(floor_gflops) * 1e3
    print(f"(the update's floor: {update_floor_ms:.1f} ms)")
    print("| pass | three GEMMs ms | one GEMM ms | one / three | saved, x the update's floor |")
    print("|---|---|---|---|---|")
    for name in cases:
        three, one = (statistics.median(times[name, i]) * 1e3 for i in (0, 1))
        saved = (three - one) / update_floor_ms
        print(f"| {name} | {three:.2f} | {one:.2f} | {one / three:.2f} | {saved:.3f} |")


# The update's first layers (nn.Linear weights, [out, in] with in narrow): rows of their input x and
# how many times per update their weight gradient is computed (d runs once per step of the horizon).
FIRST_LAYERS = {
    "encoder (z_0), 39 -> 256": (speed.BATCH, speed.OBS_DIM, 256, 1),
    "d, 54 -> 512, per step": (speed.BATCH, LATENT_DIM + speed.ACTION_DIM, 512, 5),
    "R, 54 -> 512": (5 * speed.BATCH, LATENT_DIM + speed.ACTION_DIM, 512, 1),
    "pi (policy step), 50 -> 512": (6 * speed.BATCH, LATENT_DIM, 512, 1),
}


def first_layer_weight_gradients(rounds: int) -> None:
    """
    The update's first layers' weight gradients as ``grad^T x`` (``[out, in]``: the nn.Linear weight's
    own layout) and as ``x^T grad`` (``[in, out]``, the narrow side as rows) then copied into that layout
    (``fast_layers._weight_gradient``), in turn with the floor's matmul, round after round (see 9.).
    """
    m, k, n = speed.MATMUL_SHAPE
    floor_a, floor_b = th.randn(m, k), th.randn(k, n)
    forms = {
        "grad^T x": lambda g, x: th.mm(g.t(), x),
        "x^T grad, copied": lambda g, x: th.mm(x.t(), g).t().contiguous(),
    }
    cases: dict[str, Callable[[], Any]] = {"floor": lambda: th.mm(floor_a, floor_b)}
    for layer, (rows, n_in, n_out, _) in FIRST_LAYERS.items():
        x, g = th.randn(rows, n_in), th.randn(rows, n_out)
        for form, product in forms.items():
            cases[f"{layer}: {form}"] = lambda product=product, g=g, x=x: product(g, x)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    floor_seconds = statistics.median(times["floor"])
    floor_gflops = 2 * m * k * n / floor_seconds / 1e9
    update_floor = speed.REFERENCE_GFLOP_H5["update"] / floor_gflops
    print("| weight gradient | ms (median) | x the floor's GFLOP/s |\n|---|---|---|")
    saved = 0.0
    for layer, (rows, n_in, n_out, count) in FIRST_LAYERS.items():
        medians = [statistics.median(times[f"{layer}: {form}"]) for form in forms]
        for form, seconds in zip(forms, medians, strict=True):
            throughput = 2 * rows * n_in * n_out / seconds / 1e9
            print(f"| {layer}: {form} | {seconds * 1e3:.3f} | {throughput / floor_gflops:.2f} |")
        saved += count * (medians[0] - medians[1])
    print(f"\nper update: {saved * 1e3:.2f} ms saved, {saved / update_floor:.4f}x of the update's floor")


class _GemmClock:
    """
    The time and FLOPs of every matmul that a compiled plan or update runs, as Inductor's Python
    wrapper calls them (``extern_kernels``; ``cpp_wrapper=False``) and inside the policy prior step's
    Q backward op (``fast_layers.frozen_q_member_backward``), split into full-width ones (every
    dimension >= 512) and narrow ones (the 39-, 50-, 54- and 4-wide layers, the 25 policy
    trajectories, the one-row weight gradients).
    """

    def __init__(self) -> None:
        import torch._inductor.select_algorithm as select_algorithm

        self.kernels = select_algorithm.extern_kernels
        self.originals = {name: getattr(self.kernels, name) for name in ("mm", "addmm", "bmm")}
        self.on = False
        self.calls = {"full": 0, "narrow": 0}
        self.seconds = {"full": 0.0, "narrow": 0.0}
        self.flop = {"full": 0.0, "narrow": 0.0}
        for name, fn in self.originals.items():
            setattr(self.kernels, name, self._timed(fn))
        fast_layers._frozen_q_member_backward_op.register_kernel("cpu", self._frozen_q_member_backward)

    def _frozen_q_member_backward(self, *args: th.Tensor) -> th.Tensor:
        mm = th.mm
        th.mm = self._timed(mm)  # the op's own matmuls (ATen's, called from Python)
        try:
            return fast_layers.frozen_q_member_backward(*args)
        finally:
            th.mm = mm

    def _timed(self, fn: Callable[..., th.Tensor]) -> Callable[..., th.Tensor]:
        def timed(*args: Any, **kwargs: Any) -> th.Tensor:
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            elapsed = time.perf_counter() - start
            a, b = [arg for arg in args if isinstance(arg, th.Tensor)][-2:]
            rows = a.shape[:-1].numel()
            kind = "full" if min(rows, a.shape[-1], b.shape[-1]) >= 512 else "narrow"
            self.calls[kind] += 1
            self.seconds[kind] += elapsed
            self.flop[kind] += 2 * rows * a.shape[-1] * b.shape[-1]
            return out

        return timed

    def reset(self) -> None:
        for totals in (self.calls, self.seconds, self.flop):
            totals.update(full=0, narrow=0)

    def close(self) -> None:
        for name, fn in self.originals.items():
            setattr(self.kernels, name, fn)
        fast_layers._frozen_q_member_backward_op.register_kernel("cpu", fast_layers.frozen_q_member_backward)


def gemm_accounting(rounds: int) -> None:
    """
    How long the compiled plan's and update's matmuls take where they run, against the floor: the
    matmul throughput (as speed.py measures it, before each call) and the time the reference's FLOPs
    would take at it. ``cpp_wrapper=False``, so that the matmuls are Python calls to time (the kernels
    and matmuls are the same as the C++ wrapper's); the clock's own Python adds to the whole call.
    """
    model = compiled_model(True, {**COMPILE_OPTIONS, "cpp_wrapper": False})
    plan, update = speed.plan_and_update(model, 5, th.randn(1, speed.OBS_DIM))
    timer, cpu = speed.Timer(th.device("cpu")), th.device("cpu")
    clock = _GemmClock()
    try:
        print("| what | matmuls | calls | GFLOP | ms | x floor's GFLOP/s | ms / floor ms |")
        print("|---|---|---|---|---|---|---|")
        for what, fn in (("plan", plan), ("update", update)):
            fn()
            fn()
            clock.reset()
            whole, throughputs = [], []
            for _ in range(rounds):
                throughputs.append(speed.matmul_gflops(timer, cpu))
                clock.on = True
                whole.append(timer.time(fn))
                clock.on = False
            throughput = statistics.median(throughputs)  # GFLOP/s
            floor_ms = speed.REFERENCE_GFLOP_H5[what] / throughput * 1e3
            rows = [(kind, clock.calls[kind], clock.flop[kind], clock.seconds[kind]) for kind in clock.calls]
            totals = (clock.calls, clock.flop, clock.seconds)
            rows.append(("all", *(sum(total.values()) for total in totals)))
            for kind, calls, flop, seconds in rows:
                gflop, ms = flop / rounds / 1e9, seconds / rounds * 1e3
                print(
                    f"| {what} | {kind} | {calls // rounds} | {gflop:.2f} | {ms:.1f} | "
                    f"{gflop / ms * 1e3 / throughput:.2f} | **{ms / floor_ms:.2f}** |"
                )
            ms = statistics.median(whole) * 1e3
            reference = speed.REFERENCE_GFLOP_H5[what]
            print(f"| {what} | whole call (median) | | {reference} ref. | {ms:.1f} | | {ms / floor_ms:.2f} |")
    finally:
        clock.close()


class _MatmulRecorder(TorchDispatchMode):
    """The matmul-like ATen calls made under it: the op, its operands' shapes and strides, other arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in ("mm", "addmm", "addmv", "mv", "bmm", "baddbmm"):
            layout = [(arg.shape, arg.stride()) if isinstance(arg, th.Tensor) else arg for arg in args]
            self.calls.append((func, layout, kwargs))
        return func(*args, **kwargs)


def _fresh_operands(layout: list[Any]) -> list[Any]:
    """New random operands of the recorded shapes and strides (read from memory, as the update's are)."""
    operands = []
    for item in layout:
        if isinstance(item, tuple):
            shape, stride = item
            size = 1 + sum((n - 1) * step for n, step in zip(shape, stride, strict=True))
            item = th.randn(size).as_strided(shape, stride)
        operands.append(item)
    return operands


def eager_update_bound(rounds: int) -> None:
    """
    What the eager update's matmuls alone, and its fixed cost per call, take against its floor: every
    matmul of one update recorded (the fused CPU kernels off, so that each is an ATen call: PyTorch's
    shapes), then replayed back to back on fresh operands; and the whole update at batch 8 (a 64th of
    the batch's arithmetic: left is the cost per op of Python, autograd and the dispatcher, and the
    parameter-sized work such as the optimizer steps). Each round: the
    floor's throughput, then the update, the replay and the batch-8 update.
    """
    cpu, timer = th.device("cpu"), speed.Timer(th.device("cpu"))
    model = compiled_model(False, None)
    batches = {"full": speed.make_batch(5, cpu), "small": speed.make_batch(5, cpu, batch=8)}

    def update(which: str) -> None:
        _, latents = model._update_world_model(batches[which])
        model._update_policy_prior(latents, batches[which].masks)

    recorder = _MatmulRecorder()
    with patched(NO_CPU_KERNELS), recorder:
        update("full")

    def replay(operands: list[list[Any]]) -> None:
        for (op, _, kwargs), args in zip(recorder.calls, operands, strict=True):
            op(*args, **kwargs)

    operands = [_fresh_operands(layout) for _, layout, _ in recorder.calls]
    gflop = speed.counted_gflop(lambda: replay(operands))

    def timed_replay() -> float:
        fresh = [_fresh_operands(layout) for _, layout, _ in recorder.calls]  # before the clock starts
        return timer.time(lambda: replay(fresh))

    rows = {
        "update (eager)": lambda: timer.time(lambda: update("full")),
        f"its {len(recorder.calls)} matmuls alone ({gflop:.2f} GFLOP counted), replayed": timed_replay,
        "update at batch 8 (a 64th of the arithmetic)": lambda: timer.time(lambda: update("small")),
    }
    for _ in range(2):
        update("full")
        update("small")
    times: dict[str, list[float]] = {name: [] for name in rows}
    ratios: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        floor = speed.REFERENCE_GFLOP_H5["update"] / speed.matmul_gflops(timer, cpu)
        for name, timed in rows.items():
            seconds = timed()
            times[name].append(seconds)
            ratios[name].append(seconds / floor)
    print("| what | median ms | x the update's floor (median) |\n|---|---|---|")
    for name in rows:
        ratio = statistics.median(ratios[name])
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.1f} | **{ratio:.2f}** |")


def policy_step_experiment(rounds: int, selected: list[str] | None) -> None:
    """
    The policy prior step alone (``_update_policy_prior``, after an untimed world-model step), of each
    of COMPILE_SETTINGS (those whose name contains one of ``selected``), in turn round after round.
    """
    data = speed.make_batch(5, th.device("cpu"))
    models = {
        name: (compiled_model(torch_compile, options), patches)
        for name, torch_compile, options, patches in COMPILE_SETTINGS
        if is_selected(name, selected)
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(rounds + 2):
        for name, (model, patches) in models.items():
            with patched(patches):
                _, latents = model._update_world_model(data)
                start = time.perf_counter()
                model._update_policy_prior(latents, data.masks)
                if round_index >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - start)
    print("| variant | median ms | min ms |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {min(values) * 1e3:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40, help="rounds of the chain experiment")
    parser.add_argument("--plan-rounds", type=int, default=15, help="rounds of the plan/update experiments")
    parser.add_argument("--skip-plan", action="store_true", help="no plan/update experiments")
    parser.add_argument("--skip-chain", action="store_true", help="no chain experiment")
    parser.add_argument("--buffer-rounds", type=int, default=200, help="buffer experiment rounds (0: none)")
    parser.add_argument(
        "--gemm-rounds", type=int, default=10, help="rounds of the matmul experiments (0: none)"
    )
    parser.add_argument(
        "--policy-step-rounds",
        type=int,
        default=0,
        help="rounds of the policy prior step experiment (0: none)",
    )
    parser.add_argument(
        "--tall-rounds", type=int, default=0, help="rounds of the tall matmul experiment (0: none)"
    )
    parser.add_argument(
        "--first-layer-rounds",
        type=int,
        default=0,
        help="rounds of the shared-input first layers experiment (0: none)",
    )
    parser.add_argument(
        "--weight-gradient-rounds",
        type=int,
        default=0,
        help="rounds of the first layers' weight gradient experiment (0: none)",
    )
    parser.add_argument(
        "--eager-bound-rounds",
        type=int,
        default=0,
        help="rounds of the eager update's matmuls replayed and its batch-8 cost (0: none)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="plan/update variants whose name contains this (=NAME: the variant NAME alone)",
    )
    args = parser.parse_args()
    timer = speed.Timer(th.device("cpu"))
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {th.get_num_threads()} threads, torch {th.__version__}")

    if not args.skip_chain:
        matmuls_alone, variants = chain_variants()
        chain = f"{BLOCKS} x (Linear {WIDTH}->{WIDTH}, ELU) x 2 on {ROWS} rows"
        print(f"\nchain: {chain}; floor = the 10 matmuls alone")
        interleaved(lambda: timer.time(matmuls_alone), variants, args.rounds)

    if args.buffer_rounds > 0:
        print("\nbuffer: sum tree of 1M leaves; find: 512 stratified draws, update: 512 leaves")
        buffer_experiment(args.buffer_rounds)

    if args.gemm_rounds > 0:
        print("\nmatmul floor (536x512 @ 512x512) on operands in cache and from memory")
        floor_matmul_hot_and_cold(10 * args.gemm_rounds)
        print("\nmatmuls of the compiled plan and update (horizon 5), timed where they run")
        gemm_accounting(args.gemm_rounds)

    if args.tall_rounds > 0:
        print("\ntall matmuls: [rows, 512] x [512, 512], ATen against per-thread row blocks")
        tall_matmuls(args.tall_rounds)

    if args.first_layer_rounds > 0:
        print("\nR's and Q's first layers on one [2560, 54] input: three GEMMs against one")
        shared_first_layers(args.first_layer_rounds)

    if args.weight_gradient_rounds > 0:
        print("\nfirst layers' weight gradients: in the weight's layout, or with the narrow side as rows")
        first_layer_weight_gradients(args.weight_gradient_rounds)

    if args.eager_bound_rounds > 0:
        print("\neager update: its matmuls alone and its fixed cost, against the floor (horizon 5)")
        eager_update_bound(args.eager_bound_rounds)

    if args.policy_step_rounds > 0:
        print("\npolicy prior step alone: paper settings, horizon 5")
        policy_step_experiment(args.policy_step_rounds, args.variant)

    if not args.skip_plan:
        plans, updates = plan_and_update_variants(args.variant)
        for what, variants in [("plan", plans), ("update", updates)]:
            gflop = speed.REFERENCE_GFLOP_H5[what]
            print(f"\n{what}: paper settings, horizon 5; floor = {gflop} GFLOP / matmul GFLOP/s (speed.py)")
            interleaved(
                lambda gflop=gflop: gflop / speed.matmul_gflops(timer, th.device("cpu"), calls=5),
                variants,
                args.plan_rounds,
                grad=what == "update",
            )


if __name__ == "__main__":
    main()
