"""
Fused CPU kernels (``csrc/``), built on first use by torch's C++ extension loader.

The build needs a C++ compiler and ninja (``pip install ninja``); it runs once per machine and
torch version and is cached in ``TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions``). Where it cannot
be built (one warning says why), or with ``SB3_TDMPC_CPU_KERNELS=0``, the networks run the same
computation in PyTorch ops. docs/performance.md measures the kernels; tests/test_equivalence.py
checks them against PyTorch's.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch as th
from torch.utils.flop_counter import register_flop_formula

_SOURCES = [
    str(Path(__file__).with_name("csrc") / name) for name in ("linear_elu.cpp", "layer_norm_tanh.cpp")
]
_loaded: bool | None = None  # None: not tried yet

# The ops' schemas and FLOP counts exist from import on (a FlopCounterMode entered before the build
# counts them too); the C++ sources register their CPU kernels when built.
_LIBRARY = th.library.Library("sb3_tdmpc_cpu", "DEF")
_LIBRARY.define("linear_elu(Tensor x, Tensor weight_t, Tensor bias) -> Tensor")
_LIBRARY.define("mm(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.define(
    "layer_norm_tanh(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)"
)
_LIBRARY.define("layer_norm_tanh_(Tensor(a!) x, Tensor weight, Tensor bias, float eps) -> ()")


@register_flop_formula([th.ops.sb3_tdmpc_cpu.linear_elu, th.ops.sb3_tdmpc_cpu.mm])
def _matmul_flop(x_shape: list[int], weight_t_shape: list[int], *args: Any, **kwargs: Any) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_t_shape[1]  # the matmul's, as FlopCounterMode counts mm


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

    # x86 with AVX2: the ELU's vectorised path (the source falls back to scalar code elsewhere).
    vector = th.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    flags = ["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if vector else [])]
    try:
        cpp_extension.load(
            # One build per torch version (the extension's ABI) and instruction set.
            name=f"sb3_tdmpc_cpu_kernels_torch{th.__version__.replace('.', '_').replace('+', '_')}"
            + ("_avx2" if vector else ""),
            sources=_SOURCES,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
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


def linear_elu(x: th.Tensor, weight_t: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """``ELU(x @ weight_t + bias)`` for a 2-D float32 CPU ``x`` (needs :func:`load`), no gradient."""
    return th.ops.sb3_tdmpc_cpu.linear_elu(x, weight_t, bias)


def mm(x: th.Tensor, weight: th.Tensor) -> th.Tensor:
    """``x @ weight`` for 2-D float32 CPU tensors (needs :func:`load`); many rows in row blocks per thread."""
    return th.ops.sb3_tdmpc_cpu.mm(x, weight)


def layer_norm_tanh(
    x: th.Tensor, weight: th.Tensor, bias: th.Tensor, eps: float = 1e-5
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    ``tanh(F.layer_norm(x, ...))`` over the last dimension of a 2-D float32 CPU ``x`` (needs
    :func:`load`), no gradient; with ``native_layer_norm``'s mean and rstd ``[N, 1]``.
    """
    return th.ops.sb3_tdmpc_cpu.layer_norm_tanh(x, weight, bias, eps)


def layer_norm_tanh_(x: th.Tensor, weight: th.Tensor, bias: th.Tensor, eps: float = 1e-5) -> th.Tensor:
    """:func:`layer_norm_tanh` in place (``x``'s rows contiguous), without the statistics."""
    th.ops.sb3_tdmpc_cpu.layer_norm_tanh_(x, weight, bias, eps)
    return x
