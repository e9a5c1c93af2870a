"""
Fused CPU kernels (``csrc/``), built on first use by torch's C++ extension loader.

The build needs a C++ compiler and ninja (``pip install ninja``); it runs once per machine and
torch version and is cached under ``TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions``). Where it cannot
be built (one warning says why), or with ``SB3_TDMPC_CPU_KERNELS=0``, the networks run the same
computation in PyTorch ops. docs/performance.md measures the kernels; tests/test_equivalence.py
checks them against PyTorch's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch as th
from torch.utils.flop_counter import register_flop_formula

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

_SOURCES = [
    str(Path(__file__).with_name("csrc") / name)
    for name in ("linear_elu.cpp", "layer_norm_tanh.cpp", "chains.cpp")
]
_loaded: bool | None = None  # None: not tried yet

# The ops' schemas and FLOP counts exist from import on (a FlopCounterMode entered before the build
# counts them too); the C++ sources register their CPU kernels when built.
_LIBRARY = th.library.Library("sb3_tdmpc_cpu", "DEF")
_LIBRARY.define("linear_elu(Tensor x, Tensor weight_t, Tensor bias, int block_rows=0) -> Tensor")
_LIBRARY.define("mm(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.define("elu_backward_bias_grad(Tensor grad, Tensor out) -> (Tensor, Tensor)")
_LIBRARY.define(
    "layer_norm_tanh(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)"
)
_LIBRARY.define("layer_norm_tanh_(Tensor(a!) x, Tensor weight, Tensor bias, float eps) -> ()")
_LIBRARY.define(
    "first_layer_norm_tanh_(Tensor(a!) h, Tensor bias, Tensor x, Tensor x_weight, Tensor weight, "
    "Tensor norm_bias, float eps) -> (Tensor, Tensor, Tensor)"
)
_LIBRARY.define(
    "layer_norm_tanh_backward(Tensor grad, Tensor h, Tensor mean, Tensor rstd, Tensor out, Tensor weight) "
    "-> (Tensor, Tensor, Tensor)"
)
_LIBRARY.define(
    "rollout_return(Tensor first_z_part, Tensor actions, Tensor first_weight_z, Tensor first_weight_a, "
    "Tensor first_bias, Tensor[] dynamics_weights_t, Tensor[] dynamics_biases, Tensor[] reward_weights_t, "
    "Tensor[] reward_biases, float gamma) -> (Tensor, Tensor)"
)
_LIBRARY.define(
    "policy_rollout(Tensor z0, int num_seq, int horizon, Tensor[] pi_weights_t, Tensor[] pi_biases, "
    "Tensor? action_noise, Tensor first_weight_z, Tensor first_weight_a, Tensor first_bias, "
    "Tensor[] dynamics_weights_t, Tensor[] dynamics_biases, Tensor[] reward_weights_t, "
    "Tensor[] reward_biases, float gamma) -> (Tensor, Tensor, Tensor)"
)
_LIBRARY.define("thread_shares(float[]? speeds=None, bool? balance=None) -> float[]")
_LIBRARY.define(
    "min_q_of_policy(Tensor z, Tensor[] pi_weights_t, Tensor[] pi_biases, Tensor? action_noise, "
    "Tensor[] q_weights, Tensor[] q_biases, Tensor norm_weight, Tensor norm_bias, float eps) -> Tensor"
)


@register_flop_formula([th.ops.sb3_tdmpc_cpu.linear_elu, th.ops.sb3_tdmpc_cpu.mm])
def _matmul_flop(x_shape: list[int], weight_t_shape: list[int], *args: Any, **kwargs: Any) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_t_shape[1]  # the matmul's, as FlopCounterMode counts mm


@register_flop_formula(th.ops.sb3_tdmpc_cpu.first_layer_norm_tanh_)
def _first_layer_norm_tanh_flop(
    h_shape: list[int], bias_shape: list[int], x_shape: list[int], *args: Any, **kwargs: Any
) -> int:
    return 2 * x_shape[0] * x_shape[1] * h_shape[1]  # the rank-K update's, as FlopCounterMode counts addmm


def _weights_flop(*shape_lists: list[list[int]]) -> int:
    """2 x the multiply-adds of one row through layers of these ``[in, out]`` weights."""
    return 2 * sum(n_in * n_out for shapes in shape_lists for n_in, n_out in shapes)


@register_flop_formula(th.ops.sb3_tdmpc_cpu.rollout_return)
def _rollout_return_flop(
    first_z_part_shape: list[int],
    actions_shape: list[int],
    first_weight_z_shape: list[int],
    first_weight_a_shape: list[int],
    first_bias_shape: list[int],
    dynamics_weights_t_shapes: list[list[int]],
    dynamics_biases_shapes: list[list[int]],
    reward_weights_t_shapes: list[list[int]],
    *args: Any,
    **kwargs: Any,
) -> int:
    """The matmuls of the same rollout layer by layer (``WorldModel.rollout_return``'s PyTorch ops)."""
    horizon, rows, action_dim = actions_shape
    latent_dim, width = first_weight_z_shape
    # t = 0: the z-part is given (computed per environment outside)
    first_layer = action_dim * width + (horizon - 1) * (latent_dim + action_dim) * width
    layers = _weights_flop(dynamics_weights_t_shapes, reward_weights_t_shapes)
    return rows * (2 * first_layer + horizon * layers)


@register_flop_formula(th.ops.sb3_tdmpc_cpu.policy_rollout)
def _policy_rollout_flop(
    z0_shape: list[int],
    num_seq: int,
    horizon: int,
    pi_weights_t_shapes: list[list[int]],
    *shapes: Any,
    **kwargs: Any,
) -> int:
    """The matmuls of the same rollout step by step (pi, then ``WorldModel.next``'s PyTorch ops)."""
    # shapes: pi_biases, action_noise, first_weight_z, first_weight_a, first_bias, dynamics_weights_t, ...
    (latent_dim, width), (action_dim, _) = shapes[2], shapes[3]
    first_layer = [[latent_dim + action_dim, width]]
    per_row = _weights_flop(pi_weights_t_shapes, first_layer, shapes[5], shapes[7])  # pi, d's and R's
    return z0_shape[0] * num_seq * horizon * per_row


@register_flop_formula(th.ops.sb3_tdmpc_cpu.min_q_of_policy)
def _min_q_of_policy_flop(
    z_shape: list[int],
    pi_weights_t_shapes: list[list[int]],
    pi_biases_shapes: list[list[int]],
    action_noise_shape: list[int] | None,
    q_weights_shapes: list[list[int]],
    *args: Any,
    **kwargs: Any,
) -> int:
    """The matmuls of pi and Q layer by layer (Q's output layer, a matrix-vector product, uncounted)."""
    (num_q, first_in, width), (_, hidden_in, hidden_out) = q_weights_shapes[:2]
    q = 2 * num_q * (first_in * width + hidden_in * hidden_out)
    return z_shape[0] * (_weights_flop(pi_weights_t_shapes) + q)


def load() -> bool:
    """Build (once per machine) and load the kernels; whether they are available."""
    global _loaded
    if _loaded is None:
        _loaded = _build()
    return _loaded


def _build() -> bool:
    if os.environ.get("SB3_TDMPC_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils import cpp_extension

    # x86 with AVX2 (and AVX-512): the row operations' vectorised paths (elsewhere, scalar code).
    capability = th.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp"]
    flags += ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []
    flags += ["-mavx512f"] if capability == "AVX512" else []
    # One build per torch version (the extension's ABI) and instruction set.
    name = f"sb3_tdmpc_cpu_kernels_torch{th.__version__.replace('.', '_').replace('+', '_')}"
    name += {"AVX2": "_avx2", "AVX512": "_avx512"}.get(capability, "")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_directory = Path(root) / "sb3_tdmpc" / name
    if not (build_directory / f"{name}.so").exists():
        # A first build (three C++ files at -O3) takes a while: say so rather than seem to hang.
        print(
            f"sb3_tdmpc: building its fused CPU kernels in {build_directory} "
            "(once per machine and torch version)",
            file=sys.stderr,
            flush=True,
        )
    try:
        with _exclusive_build(build_directory):
            cpp_extension.load(
                name=name,
                sources=_SOURCES,
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_directory),
                is_python_module=False,
            )
    except Exception as error:  # no compiler, no ninja, a failed build: PyTorch ops instead
        warnings.warn(
            f"sb3_tdmpc: could not build its fused CPU kernels ({type(error).__name__}: {error}); "
            "using PyTorch ops, which give the same results more slowly",
            stacklevel=2,
        )
        return False
    return True


@contextlib.contextmanager
def _exclusive_build(build_directory: Path) -> Iterator[None]:
    """
    Build in ``build_directory`` with no other process building there.

    torch's loader marks a build in progress with a ``lock`` file and waits, without end, while one
    exists, so a build that was killed (a time limit, a restart) would stall every later process. An
    ``flock`` is released by the system when its holder dies: under it, any ``lock`` file is such a leftover.
    """
    build_directory.mkdir(parents=True, exist_ok=True)
    with open(build_directory / "sb3_tdmpc.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
            leftover = build_directory / "lock"
            if leftover.exists():
                warnings.warn(
                    f"sb3_tdmpc: removing {leftover}, left by a build that did not finish", stacklevel=3
                )
                leftover.unlink(missing_ok=True)
        yield


def _weights_and_biases(layers: list[tuple[th.Tensor, th.Tensor]]) -> tuple[list[th.Tensor], list[th.Tensor]]:
    """``(weight_t, bias)`` pairs as the ops take them: the weights, then the biases."""
    return [weight_t for weight_t, _ in layers], [bias for _, bias in layers]


def thread_shares(speeds: list[float] | None = None, balance: bool | None = None) -> list[float]:
    """
    The threads' measured speeds (relative to their mean; 0: not measured yet), by which the per-thread
    kernels split rows between the threads (``csrc/row_blocks.h``). ``speeds`` replaces them and
    ``balance=False`` splits equally (tests and benchmarks); results do not depend on either.
    """
    return th.ops.sb3_tdmpc_cpu.thread_shares(speeds, balance)


def linear_elu(x: th.Tensor, weight_t: th.Tensor, bias: th.Tensor, block_rows: int = 0) -> th.Tensor:
    """
    ``ELU(x @ weight_t + bias)`` for a 2-D float32 CPU ``x`` (needs :func:`load`), no gradient.

    :param block_rows: Over 1024 rows or more, each thread's rows in blocks of about this many (0: one
        block per thread, the measured default; benchmarks/speed_experiments.py times 128)
    """
    return th.ops.sb3_tdmpc_cpu.linear_elu(x, weight_t, bias, block_rows)


def mm(x: th.Tensor, weight: th.Tensor) -> th.Tensor:
    """``x @ weight`` for 2-D float32 CPU tensors (needs :func:`load`); many rows in row blocks per thread."""
    return th.ops.sb3_tdmpc_cpu.mm(x, weight)


def elu_backward_bias_grad(grad: th.Tensor, out: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    The gradient through ELU from its output ``out [N, M]`` (ATen's ``elu_backward``) and its sum over
    the rows (the bias gradient of the layer before), in one pass.
    """
    return th.ops.sb3_tdmpc_cpu.elu_backward_bias_grad(grad, out)


def layer_norm_tanh(
    x: th.Tensor, weight: th.Tensor, bias: th.Tensor, eps: float = 1e-5
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    ``tanh(F.layer_norm(x, ...))`` over the last dimension of a 2-D float32 CPU ``x`` (needs
    :func:`load`), no gradient; with ``native_layer_norm``'s mean and rstd ``[N, 1]``.
    """
    return th.ops.sb3_tdmpc_cpu.layer_norm_tanh(x, weight, bias, eps)


def rollout_return(
    first_z_part: th.Tensor,
    actions: th.Tensor,
    first_weight_z: th.Tensor,
    first_weight_a: th.Tensor,
    first_bias: th.Tensor,
    dynamics_layers: list[tuple[th.Tensor, th.Tensor]],
    reward_layers: list[tuple[th.Tensor, th.Tensor]],
    gamma: float,
) -> tuple[th.Tensor, th.Tensor]:
    """
    ``sum_t gamma^t R(z_t, a_t)`` ``[N, 1]`` and ``z_H`` ``[N, latent]`` of ``actions`` ``[H, N, A]`` (rows
    environment by environment) with no gradient (needs :func:`load`): each thread takes its rows
    through the whole horizon.

    :param first_z_part: ``W_z z_0 + b`` of d's and R's first layers side by side, ``[E, 2 * mlp_dim]``
    :param first_weight_z: Those layers' weights for z (transposed, ``[latent, 2 * mlp_dim]``)
    :param first_weight_a: ... for the action ``[A, 2 * mlp_dim]``; ``first_bias``: their biases
    :param dynamics_layers: d's further layers, ``(weight_t [in, out], bias)``, ELU after all but the last
    :param reward_layers: R's, likewise (the last ``[mlp_dim, 1]``)
    """
    return th.ops.sb3_tdmpc_cpu.rollout_return(
        first_z_part,
        actions,
        first_weight_z,
        first_weight_a,
        first_bias,
        *_weights_and_biases(dynamics_layers),
        *_weights_and_biases(reward_layers),
        gamma,
    )


def policy_rollout(
    z0: th.Tensor,
    num_seq: int,
    horizon: int,
    pi_layers: list[tuple[th.Tensor, th.Tensor]],
    action_noise: th.Tensor | None,
    first_weight_z: th.Tensor,
    first_weight_a: th.Tensor,
    first_bias: th.Tensor,
    dynamics_layers: list[tuple[th.Tensor, th.Tensor]],
    reward_layers: list[tuple[th.Tensor, th.Tensor]],
    gamma: float,
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    The policy prior's trajectories, ``num_seq`` from each latent of ``z0`` ``[E, latent]``, with no
    gradient (needs :func:`load`): ``a_t = pi(z_t)`` (plus ``action_noise`` ``[H, E * num_seq, A]``, as
    :func:`min_q_of_policy`'s), ``z_{t+1} = d(z_t, a_t)``; each thread takes its rows through the
    whole horizon. Returns the actions ``[H, E * num_seq, A]``, ``sum_t gamma^t R(z_t, a_t)``
    ``[E * num_seq, 1]`` and ``z_H``; the layers as :func:`min_q_of_policy`'s and :func:`rollout_return`'s.
    """
    return th.ops.sb3_tdmpc_cpu.policy_rollout(
        z0,
        num_seq,
        horizon,
        *_weights_and_biases(pi_layers),
        action_noise,
        first_weight_z,
        first_weight_a,
        first_bias,
        *_weights_and_biases(dynamics_layers),
        *_weights_and_biases(reward_layers),
        gamma,
    )


def min_q_of_policy(
    z: th.Tensor,
    pi_layers: list[tuple[th.Tensor, th.Tensor]],
    action_noise: th.Tensor | None,
    q_weights: list[th.Tensor],
    q_biases: list[th.Tensor],
    norm_weight: th.Tensor,
    norm_bias: th.Tensor,
    eps: float = 1e-5,
) -> th.Tensor:
    """
    ``min_i Q_i(z, pi(z))`` ``[N, 1]`` for ``z`` ``[N, latent]`` with no gradient (needs :func:`load`):
    each thread takes its rows through pi and every Q member.

    :param pi_layers: pi's layers ``(weight_t [in, out], bias)``, ELU after all but the last, then tanh
    :param action_noise: Added to tanh's output, then clamped to (-1, 1) (already scaled and clipped)
    :param q_weights: :class:`QEnsemble`'s stacked weights ``[Q, in, out]``; ``q_biases`` ``[Q, 1, out]``
    :param norm_weight: Its LayerNorm's ``[Q, 1, hidden]``; ``norm_bias`` likewise
    """
    return th.ops.sb3_tdmpc_cpu.min_q_of_policy(
        z,
        *_weights_and_biases(pi_layers),
        action_noise,
        q_weights,
        q_biases,
        norm_weight,
        norm_bias,
        eps,
    )


def layer_norm_tanh_(x: th.Tensor, weight: th.Tensor, bias: th.Tensor, eps: float = 1e-5) -> th.Tensor:
    """:func:`layer_norm_tanh` in place (``x``'s rows contiguous), without the statistics."""
    th.ops.sb3_tdmpc_cpu.layer_norm_tanh_(x, weight, bias, eps)
    return x


def first_layer_norm_tanh_(
    h: th.Tensor,
    bias: th.Tensor,
    x: th.Tensor,
    x_weight: th.Tensor,
    weight: th.Tensor,
    norm_bias: th.Tensor,
    eps: float = 1e-5,
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    ``h += bias + x @ x_weight`` in place (``h [N, C]`` with contiguous rows, ``x [N, K]`` a few
    columns), then :func:`layer_norm_tanh` of ``h`` with its statistics, in one pass per row.
    """
    return th.ops.sb3_tdmpc_cpu.first_layer_norm_tanh_(h, bias, x, x_weight, weight, norm_bias, eps)


def layer_norm_tanh_backward(
    grad: th.Tensor, h: th.Tensor, mean: th.Tensor, rstd: th.Tensor, out: th.Tensor, weight: th.Tensor
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    The gradients (``h``'s, ``weight``'s, ``bias``'s) of :func:`layer_norm_tanh`'s ``out`` from the
    gradient of ``out``, its input ``h [N, C]`` and statistics: ATen's ``tanh_backward`` and
    ``native_layer_norm_backward`` in two passes per row.
    """
    return th.ops.sb3_tdmpc_cpu.layer_norm_tanh_backward(grad, h, mean, rstd, out, weight)
