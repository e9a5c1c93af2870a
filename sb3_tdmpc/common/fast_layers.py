"""
The networks' hot paths as functions: the same layers as their modules (``nn.Linear``/``nn.ELU``
Sequentials, :class:`~sb3_tdmpc.tdmpc.policies.QEnsemble`), evaluated with fewer passes over memory.

The networks stay plain modules, so state dicts and checkpoints are unchanged. docs/performance.md
measures each choice; tests/test_equivalence.py checks them against a plain reference computation.

On CPU, ATen's ELU (an expm1 kernel) and tanh kernels cost 2-3x its exp and sigmoid kernels,
i.e. up to a fifth of a 512x512 matmul per activation: ELU is computed as
max(x, 0) + (exp(min(x, 0)) - 1) and tanh as 2 sigmoid(2x) - 1 (equal within float rounding),
with ATen's own fused backward kernels. Elsewhere (CUDA) the native kernels are fused already.
Eager on CPU, where they build (:mod:`~sb3_tdmpc.common.cpu_kernels`), fused C++ kernels take a
Linear-ELU layer (affine_elu), Q's LayerNorm-tanh (layer_norm_tanh), the backward of both and the
backward's input gradients over many rows (matmul); the ELU and tanh above serve what they do not
take (compiled paths, a failed build).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch as th
import torch.nn.functional as F
from torch import nn

from sb3_tdmpc.common import cpu_kernels

_Activation = Callable[[th.Tensor], th.Tensor]


def _activation_forward(ctx: Any, x: th.Tensor, traced: _Activation, in_place: _Activation) -> th.Tensor:
    """
    The forward of an activation whose backward reads its output: eager, ``in_place`` over ``x`` (a
    fresh intermediate); while compiling, ``traced`` functionally. Saves the output for the backward.
    """
    if th.compiler.is_compiling():
        out = traced(x)
    else:
        ctx.mark_dirty(x)
        out = in_place(x)
    ctx.save_for_backward(out)
    return out


class _ELU(th.autograd.Function):
    """
    ELU whose backward reads its output (ATen's): eager, in place over a fresh intermediate (no saved
    tensor reads it); while compiling, traced functionally (no exp to recompute in the backward).
    """

    @staticmethod
    def forward(ctx: Any, x: th.Tensor) -> th.Tensor:
        return _activation_forward(ctx, x, traced=_traced_elu, in_place=_elu_inplace)

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> th.Tensor:
        (out,) = ctx.saved_tensors
        return _elu_backward(grad, out)


def _elu_backward(grad: th.Tensor, out: th.Tensor) -> th.Tensor:
    """The gradient through ELU (alpha 1) from its output (ATen's kernel)."""
    return th.ops.aten.elu_backward(grad, 1.0, 1, 1.0, True, out)


def elu_backward_bias_grad(grad: th.Tensor, out: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    The gradient through ELU from its output ``out [N, M]`` and its sum over the rows (the bias
    gradient of the layer before): on CPU (eager), the fused kernel's one pass; elsewhere ATen's.
    """
    if cpu_kernels_apply(out):
        return cpu_kernels.elu_backward_bias_grad(grad, out)
    grad = _elu_backward(grad, out)
    return grad, grad.sum(0)


class _Tanh(th.autograd.Function):
    """tanh whose backward reads its output (ATen's): eager, in place; while compiling, rational."""

    @staticmethod
    def forward(ctx: Any, x: th.Tensor) -> th.Tensor:
        return _activation_forward(ctx, x, traced=_rational_tanh, in_place=_sigmoid_tanh_)

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> th.Tensor:
        (out,) = ctx.saved_tensors
        return th.ops.aten.tanh_backward(grad, out)


def _sigmoid_tanh_(x: th.Tensor) -> th.Tensor:
    # tanh(x) = 2 sigmoid(2x) - 1, in place: ATen's sigmoid is faster than its tanh on CPU (docs)
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _elu_inplace(x: th.Tensor) -> th.Tensor:
    # exp(x) - 1 >= x everywhere, so ELU(x) = max(x, exp(min(x, 0)) - 1); in place: the data stays in cache
    return th.maximum(x, x.clamp(max=0.0).exp_().sub_(1.0), out=x)


# Compiled for CPU (torch_compile=True), Inductor fuses the elementwise ops between two matmuls into
# one kernel; the helpers below shape the traced graph for it:
# * a linear layer is ``mm(x, W^T)``, its bias added in the next fused kernel (``addmm`` first copies
#   the bias into its whole output: one more pass over memory per layer);
# * a one-output layer (reward, Q) is a row reduction fused with the ELU before it, not an N=1 GEMM,
#   and its weight gradient a one-row matmul, not Inductor's column reduction (_RowDot);
# * a matmul over the update's many rows (horizon x batch) gives its weight gradient in the weight's
#   own layout (_Matmul; AccumulateGrad copies any other); it runs whole, not in 512-row blocks, which
#   the AMD EPYC VM ran faster and the Intel Xeon model 207 5% slower in the compiled update;
# * ELU's exp is Cody-Waite range reduction and Cephes' polynomial in plain elementwise ops (within
#   2 ulp, tested; Inductor otherwise calls Sleef's 1-ulp exp), and its backward reads the output
#   (ATen's, as eager), instead of recomputing the exp; tanh is a rational function, no exp at all.
# docs/performance.md measures each; tests/test_equivalence.py checks compiled against eager.

_ROW_BLOCK = 512  # the policy prior step's frozen Q backward, over the reached rows
_MANY_ROWS = 1024  # a compiled layer over this many rows or more is the update's (horizon x batch)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's, as TD-MPC's Q
_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.693359375, -2.12194440e-4
_EXP_POLY = (  # Cephes' expf, in ascending powers
    0.5,
    1.6666665459e-1,
    4.1665795894e-2,
    8.3334519073e-3,
    1.3981999507e-3,
    1.9875691500e-4,
)


def _exp(x: th.Tensor) -> th.Tensor:
    """exp(x) for float32 ``x`` in [-87, 0] (ELU's negative part), traced for torch.compile on CPU."""
    if not compiling_for_cpu(x) or x.dtype != th.float32:
        return x.exp()
    x = x.clamp(min=-87.0)  # exp(-87) ~ 1.6e-38, the smallest normal float; ELU is -1 there anyway
    n = th.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO  # x = n ln2 + r, |r| <= ln2 / 2
    poly = _horner(r, _EXP_POLY) * r
    two_to_n = ((n + 127.0) * 8388608.0).to(th.int32).view(th.float32)  # 2^n: the exponent bits
    return (poly * r + r + 1.0) * two_to_n


# tanh(x) = x P(x^2) / Q(x^2) for x clamped to [-c, c] (tanh(c) is 1 to float32 precision): the
# rational minimax approximation of Eigen's generic_fast_tanh_float, coefficients in ascending powers.
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def _horner(x: th.Tensor, coefficients: tuple[float, ...]) -> th.Tensor:
    result = x * coefficients[-1] + coefficients[-2]
    for coefficient in reversed(coefficients[:-2]):
        result = result * x + coefficient
    return result


def _rational_tanh(x: th.Tensor) -> th.Tensor:
    """tanh(x) within 6 ulp (3e-7), traced for torch.compile on CPU: no exp, one division."""
    x = x.clamp(-_TANH_CLAMP, _TANH_CLAMP)
    x2 = x * x
    return x * _horner(x2, _TANH_P) / _horner(x2, _TANH_Q)


def compiling_for_cpu(x: th.Tensor) -> bool:
    return x.device.type == "cpu" and th.compiler.is_compiling()


def affine(x: th.Tensor, weight_t: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """
    ``x @ weight_t + bias`` (``weight_t``: ``[in, out]``): eager, ``addmm`` on a 2-D ``x``; while
    compiling for CPU, any ``[..., in]`` ``x``, shaped for Inductor's fusion.
    """
    compiling = compiling_for_cpu(x)
    if weight_t.shape[1] == 1:
        if compiling:
            return _RowDot.apply(x, weight_t[:, 0]) + bias
        # [N, hidden] x [hidden, 1]: a matrix-vector product (as a matmul with N=1 it is 10x slower)
        return th.addmv(bias, x, weight_t[:, 0]).unsqueeze(-1)
    if not compiling:
        return th.addmm(bias, x, weight_t)
    rows = x.shape[:-1].numel()
    if rows >= _MANY_ROWS:  # the update's: weight gradients in the weights' layout
        product = _Matmul.apply(x.reshape(rows, x.shape[-1]), weight_t)
        return add_bias(product, bias).reshape(*x.shape[:-1], weight_t.shape[1])
    return add_bias(th.matmul(x, weight_t), bias)


class _RowDot(th.autograd.Function):
    """
    ``x @ w`` for a vector ``w`` (a one-output layer) as a row reduction, which torch.compile fuses
    with the kernel that computes ``x``. The weight gradient ``g^T x`` is a matmul: Inductor would
    run it as a column reduction, one strided pass over ``x`` per 8 columns, many times slower.
    """

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, w: th.Tensor) -> th.Tensor:
        ctx.save_for_backward(x, w)
        return (x * w).sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor | None, th.Tensor | None]:
        x, w = ctx.saved_tensors
        grad_x = grad * w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = th.mm(grad.reshape(1, -1), x.reshape(-1, x.shape[-1]))[0]
        return grad_x, grad_w


def add_bias(product: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """``product + bias``; while compiling for CPU, in the next fused kernel."""
    if compiling_for_cpu(product):
        return product - (-bias)  # Inductor turns `mm + bias` back into addmm, which first copies the bias
    return product + bias


def add_narrow_matmul(base: th.Tensor, x: th.Tensor, weight_t: th.Tensor) -> th.Tensor:
    """
    ``base + x @ weight_t`` for an ``x`` of a few columns (the action): eager, ``addmm`` (``baddbmm``
    for a 3-D ``x``); while compiling for CPU, one scaled row of ``weight_t`` per column of ``x``,
    which fuse into the next kernel (as a GEMM, K = 4 runs at a tenth of the floor's speed).
    """
    if compiling_for_cpu(x):
        for k in range(x.shape[-1]):
            base = base + x[..., k : k + 1] * weight_t[k]
        return base
    if x.dim() == 3:
        return th.baddbmm(base, x, weight_t.expand(x.shape[0], *weight_t.shape))
    return th.addmm(base, x, weight_t)


class _Matmul(th.autograd.Function):
    """
    ``x @ weight_t`` (2-D) whose weight gradient comes in ``weight_t``'s own layout
    (:func:`_matmul_backward`), where autograd's would need a copy into the parameter's. Traced by
    torch.compile (the compiled update's layers).
    """

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, weight_t: th.Tensor) -> th.Tensor:
        ctx.save_for_backward(x, weight_t)
        return th.mm(x, weight_t)

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor | None, th.Tensor | None]:
        return _matmul_backward(ctx.needs_input_grad, grad, *ctx.saved_tensors)


def _matmul_backward(
    needs_grad: tuple[bool, ...], grad: th.Tensor, x: th.Tensor, weight_t: th.Tensor
) -> tuple[th.Tensor | None, th.Tensor | None]:
    """The gradients of ``x @ weight_t`` (2-D) that ``needs_grad`` asks for, given the output's."""
    grad_x = grad_w = None
    if needs_grad[0]:
        grad_x = matmul(grad, weight_t.t())
    if needs_grad[1]:
        grad_w = _weight_gradient(grad, x, weight_t)
    return grad_x, grad_w


def _weight_gradient(grad: th.Tensor, x: th.Tensor, weight_t: th.Tensor) -> th.Tensor:
    """
    ``x^T grad`` (``[in, out]``) in ``weight_t``'s own layout, so that the parameter receives a gradient
    with its own strides (AccumulateGrad copies any other): an nn.Linear weight's (``weight.t()``,
    column-major) as ``(grad^T x)^T``. MKL runs a product with many rows and few columns up to about
    twice as slowly as its transpose (a first layer's ``grad^T x``, ``[512, 54]``, against ``x^T grad``,
    ``[54, 512]``), so a narrow layer's is computed with its narrow side as rows, then copied into the
    weight's layout (a small copy).
    """
    column_major = weight_t.stride(0) < weight_t.stride(1)
    n_in, n_out = weight_t.shape
    in_as_rows = n_in < n_out if n_in != n_out else not column_major  # equal sides: the weight's layout
    grad_w = th.mm(x.t(), grad) if in_as_rows else th.mm(grad.t(), x).t()
    if in_as_rows == column_major:  # the other layout's product: copied into the weight's
        return th.empty_like(weight_t).copy_(grad_w)  # empty_like keeps a dense tensor's strides
    return grad_w


def matmul(x: th.Tensor, weight: th.Tensor) -> th.Tensor:
    """
    ``x @ weight`` (2-D); eager on CPU over many rows, each thread over its own rows (the C++ kernel's,
    where it builds).
    """
    if cpu_kernels_apply(x):
        return cpu_kernels.mm(x, weight)
    return th.mm(x, weight)


class _AffineELU(th.autograd.Function):
    """
    ``ELU(x @ weight_t + bias)`` (2-D ``x``) by the fused CPU kernel; the backward reads the output
    (ELU's gradient from it, as :class:`_ELU`, with the bias gradient in the same pass), then the
    affine map's gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, weight_t: th.Tensor, bias: th.Tensor) -> th.Tensor:
        out = cpu_kernels.linear_elu(x, weight_t, bias)
        ctx.save_for_backward(x, weight_t, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor | None, ...]:
        x, weight_t, out = ctx.saved_tensors
        grad, grad_bias = elu_backward_bias_grad(grad, out)
        grad_x, grad_weight = _matmul_backward(ctx.needs_input_grad, grad, x, weight_t)
        return grad_x, grad_weight, grad_bias if ctx.needs_input_grad[2] else None


class FrozenQMember(th.autograd.Function):
    """
    One Q member (Linear-LayerNorm-tanh-Linear-ELU-Linear) with frozen weights, differentiated with
    respect to the action alone: the policy prior's step. The backward runs only over the rows that
    the output gradient reaches (min(Q1, Q2) reaches one member per row; elsewhere, with finite
    activations, every gradient of the chain is exactly zero), in 512-row blocks, from the
    activations the forward saved: autograd's action gradient with about half the backward work.
    """

    @staticmethod
    def forward(
        ctx: Any,
        z_product: th.Tensor,
        b1: th.Tensor,
        action: th.Tensor,
        w_a: th.Tensor,
        norm_weight: th.Tensor,
        norm_bias: th.Tensor,
        w2: th.Tensor,
        b2: th.Tensor,
        w3: th.Tensor,
        b3: th.Tensor,
    ) -> th.Tensor:
        h1, t, mean, rstd = first_layer_norm_tanh(z_product, b1, action, w_a, norm_weight, norm_bias)
        e2 = affine_elu(t, w2, b2)
        ctx.save_for_backward(h1, mean, rstd, t, e2, w_a, norm_weight, w2, w3)
        return affine(e2, w3, b3)

    @staticmethod
    def backward(ctx: Any, grad_q: th.Tensor) -> tuple[th.Tensor | None, ...]:
        backward = _frozen_q_member_backward_op if th.compiler.is_compiling() else frozen_q_member_backward
        return None, None, backward(grad_q, *ctx.saved_tensors), *([None] * 7)


def reached_rows(grad: th.Tensor) -> th.Tensor:
    """Indices of the rows of ``grad [N, 1]`` that are not zero (a NaN counts as nonzero)."""
    return grad[:, 0].ne(0).nonzero().squeeze(1)


def frozen_q_member_backward(
    grad_q: th.Tensor,
    h1: th.Tensor,
    mean: th.Tensor,
    rstd: th.Tensor,
    t: th.Tensor,
    e2: th.Tensor,
    w_a: th.Tensor,
    norm_weight: th.Tensor,
    w2: th.Tensor,
    w3: th.Tensor,
) -> th.Tensor:
    """The action gradient of :class:`FrozenQMember`, over the rows that ``grad_q`` reaches."""
    rows = reached_rows(grad_q)
    grad_action = grad_q.new_zeros(grad_q.shape[0], w_a.shape[0])
    for block in rows.split(_ROW_BLOCK):  # no rows: one empty block
        grad = grad_q.index_select(0, block) * w3[:, 0]
        grad = _elu_backward(grad, e2.index_select(0, block))
        grad = th.mm(grad, w2.t())
        saved = [x.index_select(0, block) for x in (h1, mean, rstd, t)]
        grad = layer_norm_tanh_backward(grad, *saved, norm_weight, (True, False, False))[0]
        grad_action.index_copy_(0, block, th.mm(grad, w_a.t()))
    return grad_action


# For torch.compile, an opaque op: the number of rows it runs over depends on the data.
_frozen_q_member_backward_op = th.library.custom_op(
    "sb3_tdmpc::frozen_q_member_backward", frozen_q_member_backward, mutates_args=()
)


@_frozen_q_member_backward_op.register_fake
def _frozen_q_member_backward_fake(grad_q: th.Tensor, *saved: th.Tensor) -> th.Tensor:
    return grad_q.new_empty(grad_q.shape[0], saved[5].shape[0])


def _traced_elu(x: th.Tensor) -> th.Tensor:
    # _elu_inplace's formula, functional: one fused kernel when compiled
    return th.maximum(x, _exp(x.clamp(max=0.0)) - 1.0)


def linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None) -> th.Tensor:
    """``F.linear``; while compiling for CPU, shaped for Inductor's fusion (:func:`affine`)."""
    if bias is None or not compiling_for_cpu(x):
        return F.linear(x, weight, bias)
    return affine(x, weight.t(), bias)


def _activation(
    x: th.Tensor,
    native: _Activation,
    function: type[th.autograd.Function],
    traced: _Activation,
    in_place: _Activation,
) -> th.Tensor:
    """
    An activation of a fresh intermediate ``x``: off CPU ``native`` (fused there already); with a
    gradient ``function`` (its backward reads the output); compiling, ``traced``; else ``in_place``.
    """
    if x.device.type != "cpu":
        return native(x)
    if x.requires_grad and th.is_grad_enabled():
        return function.apply(x)
    return traced(x) if th.compiler.is_compiling() else in_place(x)


def elu_(x: th.Tensor) -> th.Tensor:
    """
    ELU (alpha 1) of a fresh intermediate ``x`` (the output of a linear layer), which it overwrites;
    compiling, traced functionally, which torch.compile fuses into one kernel.
    """
    return _activation(x, F.elu, _ELU, traced=_traced_elu, in_place=_elu_inplace)


def cpu_kernels_apply(x: th.Tensor) -> bool:
    """
    Whether the fused CPU kernels compute with ``x``: float32 on CPU, eager, the kernels built.
    Compiled, Inductor's matmul and fused ELU measured faster in the planner (docs/performance.md).
    """
    eager_float32_cpu = x.device.type == "cpu" and x.dtype == th.float32 and not th.compiler.is_compiling()
    return eager_float32_cpu and cpu_kernels.load()


def chain_kernels_apply(x: th.Tensor) -> bool:
    """
    Whether the whole-chain kernels (``rollout_return``, ``min_q_of_policy``: each thread takes its
    rows through all layers) compute with ``x``: :func:`cpu_kernels_apply`, and no gradient.
    """
    return not th.is_grad_enabled() and cpu_kernels_apply(x)


def affine_elu(x: th.Tensor, weight_t: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """
    ``ELU(x @ weight_t + bias)``: on CPU (eager), one fused kernel, the ELU applied to each block of
    the product while it is in cache (:mod:`sb3_tdmpc.common.cpu_kernels`).
    """
    rows, shape = x.reshape(-1, x.shape[-1]), (*x.shape[:-1], weight_t.shape[1])
    if cpu_kernels_apply(x):
        if th.is_grad_enabled() and (x.requires_grad or weight_t.requires_grad or bias.requires_grad):
            return _AffineELU.apply(rows, weight_t, bias).view(shape)
        return cpu_kernels.linear_elu(rows, weight_t, bias).view(shape)
    return elu_(affine(rows, weight_t, bias)).view(shape)


def tanh_(x: th.Tensor) -> th.Tensor:
    """
    tanh of a fresh intermediate ``x``, which it overwrites; compiling, rational (Inductor's tanh and
    sigmoid, Sleef's exp, cost more than Q's LayerNorm).
    """
    return _activation(x, th.tanh, _Tanh, traced=_rational_tanh, in_place=_sigmoid_tanh_)


class _LayerNormTanh(th.autograd.Function):
    """``tanh(LayerNorm(h))`` by the fused CPU kernels, the backward from the output and statistics."""

    @staticmethod
    def forward(ctx: Any, h: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
        out, mean, rstd = cpu_kernels.layer_norm_tanh(h, weight, bias, LAYER_NORM_EPS)
        ctx.save_for_backward(h, weight, mean, rstd, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor | None, ...]:
        h, weight, mean, rstd, out = ctx.saved_tensors
        return layer_norm_tanh_backward(grad, h, mean, rstd, out, weight, ctx.needs_input_grad)


def layer_norm_tanh_backward(
    grad: th.Tensor,
    h: th.Tensor,
    mean: th.Tensor,
    rstd: th.Tensor,
    out: th.Tensor,
    weight: th.Tensor,
    needs_grad: tuple[bool, ...],
) -> tuple[th.Tensor | None, ...]:
    """
    The gradients (``h``'s, the LayerNorm weight's and bias's, those ``needs_grad`` asks for) of
    ``out = tanh(LayerNorm(h))`` from ``out``'s, its input ``h [N, C]`` and the statistics: on CPU
    (eager), the fused kernel's two passes per row; elsewhere ATen's tanh and LayerNorm backward.
    """
    if cpu_kernels_apply(h):
        grads = cpu_kernels.layer_norm_tanh_backward(grad, h, mean, rstd, out, weight)
        return tuple(g if needed else None for g, needed in zip(grads, needs_grad, strict=True))
    grad = th.ops.aten.tanh_backward(grad, out)
    grad_h, grad_weight, _ = th.ops.aten.native_layer_norm_backward(
        grad, h, [h.shape[-1]], mean, rstd, weight, None, [*needs_grad[:2], False]
    )
    return grad_h, grad_weight, grad.sum(0) if needs_grad[2] else None


def layer_norm_tanh(h: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """
    ``tanh(LayerNorm(h))`` over the last dimension (Q's first activation) of a fresh intermediate
    ``h [N, C]``, which it may overwrite: on CPU (eager), one fused kernel, one pass per row in cache.
    """
    grad = th.is_grad_enabled() and (h.requires_grad or weight.requires_grad or bias.requires_grad)
    if cpu_kernels_apply(h):
        if grad:
            return _LayerNormTanh.apply(h, weight, bias)
        return cpu_kernels.layer_norm_tanh_(h, weight, bias, LAYER_NORM_EPS)
    if h.device.type == "cpu" and not grad and not compiling_for_cpu(h):
        # tanh(y) = 2 sigmoid(2y) - 1, with the (exact) factor 2 in the LayerNorm's affine
        h = F.layer_norm(h, h.shape[-1:], weight * 2.0, bias * 2.0, LAYER_NORM_EPS)
        return h.sigmoid_().mul_(2.0).sub_(1.0)
    return tanh_(F.layer_norm(h, h.shape[-1:], weight, bias, LAYER_NORM_EPS))


def first_layer_norm_tanh(
    z_product: th.Tensor,
    bias: th.Tensor,
    action: th.Tensor,
    w_a: th.Tensor,
    norm_weight: th.Tensor,
    norm_bias: th.Tensor,
) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
    """
    Q's first layer ``h = z W_z + b + a W_a`` from ``z_product = z W_z`` (a fresh intermediate, which
    it may overwrite), then ``tanh(LayerNorm(h))``, without autograd: ``h``, the output and the mean
    and rstd that its backward reads. On CPU (eager), one fused pass per row.
    """
    if cpu_kernels_apply(z_product):
        return z_product, *cpu_kernels.first_layer_norm_tanh_(
            z_product, bias, action, w_a, norm_weight, norm_bias, LAYER_NORM_EPS
        )
    h = add_narrow_matmul(add_bias(z_product, bias), action, w_a)
    y, mean, rstd = th.native_layer_norm(h, [h.shape[-1]], norm_weight, norm_bias, LAYER_NORM_EPS)
    return h, tanh_(y), mean, rstd


def is_elu_mlp(net: nn.Module) -> bool:
    """
    Whether ``net`` is a :func:`~sb3_tdmpc.tdmpc.policies.mlp` (Linear, then ELU-Linear pairs), which
    the fast path evaluates.
    """
    if not isinstance(net, nn.Sequential) or len(net) % 2 == 0:
        return False
    return all(type(m) is (nn.Linear if i % 2 == 0 else nn.ELU) for i, m in enumerate(net))


def transposed_layers(net: nn.Sequential, first: int = 0) -> list[tuple[th.Tensor, th.Tensor]]:
    """
    ``(weight.t(), bias)`` of an ``mlp``'s linear layers (:func:`is_elu_mlp`) from module ``first`` on,
    as the chain kernels take them.
    """
    return [(layer.weight.t(), layer.bias) for layer in list(net)[first::2]]


def forward_mlp(net: nn.Module, x: th.Tensor) -> th.Tensor:
    """``net(x)``, layer by layer with the fast ELU where ``net`` is an ``mlp`` (:func:`is_elu_mlp`)."""
    if not is_elu_mlp(net):
        return net(x)
    *hidden, last = list(net)[::2]
    for layer in hidden:
        x = affine_elu(x, layer.weight.t(), layer.bias)
    return linear(x, last.weight, last.bias)
