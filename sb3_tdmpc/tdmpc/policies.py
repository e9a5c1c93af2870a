"""TD-MPC's world model (TOLD) and its sampling-based planner.

Notation follows Hansen et al. (2022): encoder ``h``, latent dynamics ``d``, reward ``R``,
policy prior ``pi`` and the twin action-value functions ``Q``. Actions live in [-1, 1]; the
policy unscales them to the environment's bounds (``squash_output=True``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import (
    is_image_space,
    is_image_space_channels_first,
    preprocess_obs,
)
from stable_baselines3.common.torch_layers import create_mlp
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.utils import get_device
from torch import nn

from sb3_tdmpc.common import cpu_kernels
from sb3_tdmpc.common.fast_layers import (
    LAYER_NORM_EPS,
    FrozenQMember,
    add_narrow_matmul,
    affine,
    affine_elu,
    chain_kernels_apply,
    compiling_for_cpu,
    elu_,
    forward_mlp,
    is_elu_mlp,
    layer_norm_tanh,
    linear,
    matmul,
    transposed_layers,
)


def mlp(in_dim: int, hidden_dims: list[int], out_dim: int) -> nn.Sequential:
    """Linear-ELU layers, then a linear output (TD-MPC's ``h.mlp`` and state encoder)."""
    return nn.Sequential(*create_mlp(in_dim, out_dim, hidden_dims, nn.ELU))


def check_settings(*checks: tuple[str, Any, bool, str]) -> None:
    """Raise a ValueError for the first ``(name, value, valid, requirement)`` that is not valid."""
    for name, value, valid, requirement in checks:
        if not valid:
            raise ValueError(f"{name} must be {requirement}, got {value}")


class PixelEncoder(nn.Module):
    """
    TD-MPC's pixel encoder: ``x / 255``, 4 conv layers (``num_channels`` channels, kernels 7/5/3/3,
    stride 2, ReLU), then linear to the latent. Convs are orthogonal with ReLU gain, biases zero.

    :param observation_space: Channels-first image space ``(C, H, W)`` (C = 3 * frame stack)
    :param latent_dim: Size of the latent state
    :param num_channels: Channels of every conv layer
    """

    def __init__(self, observation_space: spaces.Box, latent_dim: int, num_channels: int = 32) -> None:
        super().__init__()
        in_channels = observation_space.shape[0]
        convs: list[nn.Module] = []
        for kernel in (7, 5, 3, 3):
            convs += [nn.Conv2d(in_channels, num_channels, kernel, stride=2), nn.ReLU()]
            in_channels = num_channels
        self.convs = nn.Sequential(*convs, nn.Flatten())
        for module in self.convs:
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight, nn.init.calculate_gain("relu"))
                nn.init.zeros_(module.bias)
        with th.no_grad():
            try:
                n_flat = self.convs(th.zeros(1, *observation_space.shape)).shape[1]
            except RuntimeError as error:  # an image smaller than a kernel after the strides before it
                height, width = observation_space.shape[1:]
                raise ValueError(
                    f"PixelEncoder's four stride-2 convolutions need images of at least 39x39 pixels, got "
                    f"{height}x{width}"
                ) from error
        self.linear = nn.Linear(n_flat, latent_dim)
        self.image_shape = tuple(observation_space.shape)

    def forward(self, obs: th.Tensor) -> th.Tensor:
        """:param obs: Images ``[..., C, H, W]``, uint8 or float in [0, 255]; :return: ``[..., latent]``"""
        batch_shape = obs.shape[: -len(self.image_shape)]
        x = obs.reshape(-1, *self.image_shape).float() / 255.0
        return self.linear(self.convs(x)).reshape(*batch_shape, -1)


class RandomShift(nn.Module):
    """
    Random-shift augmentation (DrQ-v2's ``RandomShiftsAug``, as TD-MPC applies it to pixel inputs):
    pad by ``pad`` pixels replicating the border, then crop back to the original size at a random
    integer offset, independently per image.

    :param pad: Largest shift in pixels (TD-MPC: ``image_size / 21``, 4 for 84x84)
    """

    def __init__(self, pad: int = 4) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, obs: th.Tensor) -> th.Tensor:
        """:param obs: Images ``[..., C, H, W]`` (any dtype); :return: shifted float32 images, same shape"""
        shape = obs.shape
        x = obs.reshape(-1, *shape[-3:]).float()
        n, _, h, w = x.shape
        if h != w:
            raise ValueError(f"RandomShift needs square images, got {h}x{w}")
        x = F.pad(x, (self.pad,) * 4, mode="replicate")
        eps = 1.0 / (h + 2 * self.pad)
        arange = th.linspace(-1.0 + eps, 1.0 - eps, h + 2 * self.pad, device=x.device)[:h]
        arange = arange.unsqueeze(0).repeat(h, 1).unsqueeze(2)
        base_grid = th.cat([arange, arange.transpose(1, 0)], dim=2).unsqueeze(0).repeat(n, 1, 1, 1)
        shift = th.randint(0, 2 * self.pad + 1, size=(n, 1, 1, 2), device=x.device).float()
        grid = base_grid + shift * (2.0 / (h + 2 * self.pad))
        return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False).reshape(shape)


class QEnsemble(nn.Module):
    """
    ``num_q`` action-value functions, each Linear-LayerNorm-Tanh-Linear-ELU-Linear, with their
    weights stacked in ``[num_q, in, out]`` parameters.

    :param in_dim: Size of the input (latent + action)
    :param hidden_dim: Width of the hidden layers
    :param num_q: Number of Q-functions in the ensemble
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_q: int = 2) -> None:
        super().__init__()
        self.num_q, self.hidden_dim = num_q, hidden_dim
        self.weights = nn.ParameterList(
            [
                nn.Parameter(th.empty(num_q, n_in, n_out))
                for n_in, n_out in [(in_dim, hidden_dim), (hidden_dim, hidden_dim), (hidden_dim, 1)]
            ]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(th.zeros(num_q, 1, n_out)) for n_out in (hidden_dim, hidden_dim, 1)]
        )
        self.norm_weight = nn.Parameter(th.ones(num_q, 1, hidden_dim))
        self.norm_bias = nn.Parameter(th.zeros(num_q, 1, hidden_dim))
        with th.no_grad():
            for weight in self.weights[:-1]:
                for member in range(num_q):
                    # Orthogonal like nn.Linear's (out, in) weight, stored [in, out] for x @ W.
                    nn.init.orthogonal_(weight[member].T)
        # TD-MPC zeroes the output layer of Q.
        nn.init.zeros_(self.weights[-1])

    def forward(self, z: th.Tensor, action: th.Tensor) -> th.Tensor:
        """
        :param z: Latent states ``[..., latent_dim]``
        :param action: Actions ``[..., action_dim]``
        :return: Q-values ``[num_q, ..., 1]``
        """
        # Each stacked parameter unbound once: its backward is one stack, where indexing member by member
        # would allocate a zeroed copy of the whole stack per member and sum them.
        w1, w2, w3 = (weight.unbind(0) for weight in self.weights)
        vectors = (*self.biases, self.norm_weight, self.norm_bias)
        b1, b2, b3, norm_weight, norm_bias = (vector.view(self.num_q, -1).unbind(0) for vector in vectors)
        batch_shape = th.broadcast_shapes(z.shape[:-1], action.shape[:-1])
        latent_dim = z.shape[-1]
        z = z.expand(*batch_shape, latent_dim).reshape(-1, latent_dim)
        action = action.expand(*batch_shape, action.shape[-1]).reshape(-1, action.shape[-1])
        grad = th.is_grad_enabled()
        # The policy update: W_z z + W_a a, so that no gradient is computed for the detached z.
        split = grad and action.requires_grad and not z.requires_grad
        x = None if split else th.cat([z, action], dim=-1)
        # Member by member: on CPU two [N, hidden] matmul chains run faster than one batched (bmm)
        # chain, most of all backward (docs/performance.md).
        # The policy prior's step on CPU (Q frozen): each member's backward over the rows min(Q1, Q2) reaches.
        frozen = split and not self.weights[0].requires_grad and z.device.type == "cpu"
        values = []
        for q in range(self.num_q):
            if split:
                w_z, w_a = w1[q].split([latent_dim, w1[q].shape[0] - latent_dim])
                if frozen:
                    first = matmul(z, w_z), b1[q], action, w_a, norm_weight[q], norm_bias[q]
                    values.append(FrozenQMember.apply(*first, w2[q], b2[q], w3[q], b3[q]))
                    continue
                h = add_narrow_matmul(affine(z, w_z, b1[q]), action, w_a)
            else:
                h = affine(x, w1[q], b1[q])
            h = layer_norm_tanh(h, norm_weight[q], norm_bias[q])
            h = affine_elu(h, w2[q], b2[q])
            values.append(affine(h, w3[q], b3[q]))
        return th.stack(values).reshape(self.num_q, *batch_shape, 1)


def policy_noise(shape: tuple[int, ...] | th.Size, std: float, like: th.Tensor) -> th.Tensor:
    """
    The policy prior's action noise, N(0, std^2) clipped to +-0.3 (TD-MPC's ``TruncatedNormal(clip=0.3)``),
    on ``like``'s device and dtype.
    """
    return (th.randn(shape, device=like.device, dtype=like.dtype) * std).clamp(-0.3, 0.3)


def min_q_of_policy(model: nn.Module, q: nn.Module, z: th.Tensor, std: float) -> th.Tensor:
    """
    ``min_i Q_i(z, pi(z))`` ``[..., 1]``: ``model``'s policy prior (noise of scale ``std``) and the
    ensemble ``q`` (the model's, or its target's for TD targets). With no gradient on CPU (eager), one
    fused C++ call in which each thread takes its rows through pi and every Q member.
    """
    pi_net = getattr(model, "pi_net", None)
    if isinstance(q, QEnsemble) and pi_net is not None and is_elu_mlp(pi_net) and chain_kernels_apply(z):
        rows = z.reshape(-1, z.shape[-1])
        noise = policy_noise((rows.shape[0], pi_net[-1].out_features), std, z) if std > 0 else None
        pi_layers = transposed_layers(pi_net)
        q_layers = list(q.weights), list(q.biases)
        value = cpu_kernels.min_q_of_policy(
            rows, pi_layers, noise, *q_layers, q.norm_weight, q.norm_bias, LAYER_NORM_EPS
        )
        return value.view(*z.shape[:-1], 1)
    return q(z, model.pi(z, std)).min(dim=0).values


def stepwise_return(
    next_fn: Callable[[th.Tensor, th.Tensor], tuple[th.Tensor, th.Tensor]],
    z: th.Tensor,
    actions: th.Tensor,
    gamma: float,
) -> tuple[th.Tensor, th.Tensor]:
    """
    ``sum_t gamma^t R(z_t, a_t)`` and ``z_H``, one ``z_{t+1}, r_t = next_fn(z_t, a_t)`` step at a time.

    :param z: Start latents ``[..., latent_dim]``, one per action sequence
    :param actions: Action sequences ``[H, ..., action_dim]``
    """
    value, discount = th.zeros((), device=z.device, dtype=z.dtype), 1.0
    for action in actions:
        z, reward = next_fn(z, action)
        value, discount = value + discount * reward, discount * gamma
    return value, z


def policy_rollout(
    model: nn.Module, z: th.Tensor, num_trajectories: int, horizon: int, std: float, gamma: float
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    ``num_trajectories`` trajectories of ``model``'s policy prior from each environment's latent:
    ``a_t = pi(z_t)`` (noise of scale ``std``), ``z_{t+1} = d(z_t, a_t)``, for ``horizon >= 1`` steps.
    With no gradient on CPU (eager), one fused C++ call in which each thread takes its rows through
    the whole horizon (the noise drawn before, step by step, as pi draws it).

    :param model: A :class:`WorldModel`, or any model with its ``pi`` and ``next``
    :param z: Start latents ``[E, latent_dim]``
    :return: The actions ``[H, E, P, A]``, ``sum_t gamma^t R(z_t, a_t)`` ``[E, P, 1]`` and ``z_H``
        ``[E, P, latent_dim]``
    """
    (num_envs, latent_dim), num_pi = z.shape, num_trajectories
    batch = (num_envs, num_pi)
    fast = isinstance(model, WorldModel) and model._fast_next() and is_elu_mlp(model.pi_net)
    if fast and num_pi > 0 and chain_kernels_apply(z):
        shape = (*batch, model.pi_net[-1].out_features)
        noise = th.stack([policy_noise(shape, std, z) for _ in range(horizon)]) if std > 0 else None
        weight_t, bias = model._fused_first_layer()
        actions, value, z_end = cpu_kernels.policy_rollout(
            z,
            num_pi,
            horizon,
            transposed_layers(model.pi_net),
            None if noise is None else noise.view(horizon, num_envs * num_pi, -1),
            weight_t[:latent_dim],
            weight_t[latent_dim:],
            bias,
            transposed_layers(model.dynamics, 2),
            transposed_layers(model.reward, 2),
            gamma,
        )
        return actions.view(horizon, *shape), value.view(*batch, 1), z_end.view(*batch, latent_dim)
    z_t = z.unsqueeze(1).expand(*batch, latent_dim)
    actions, value, discount = [], th.zeros((), device=z.device, dtype=z.dtype), 1.0
    for _ in range(horizon):
        actions.append(model.pi(z_t, std))
        z_t, reward = model.next(z_t, actions[-1])
        value, discount = value + discount * reward, discount * gamma
    return th.stack(actions), value.expand(*batch, 1), z_t


class WorldModel(nn.Module):
    """
    TOLD, TD-MPC's task-oriented latent dynamics model.

    :param obs_dim: Size of the (flat) observation
    :param action_dim: Size of the action
    :param latent_dim: Size of the latent state z
    :param mlp_dim: Width of the dynamics, reward, policy and Q networks
    :param enc_dim: Width of the state encoder
    :param num_q: Number of Q-functions
    :param encoder: Encoder to use instead of the state MLP (e.g. :class:`PixelEncoder`)
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        latent_dim: int = 50,
        mlp_dim: int = 512,
        enc_dim: int = 256,
        num_q: int = 2,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = mlp(obs_dim, [enc_dim], latent_dim) if encoder is None else encoder
        self.dynamics = mlp(latent_dim + action_dim, [mlp_dim, mlp_dim], latent_dim)
        self.reward = mlp(latent_dim + action_dim, [mlp_dim, mlp_dim], 1)
        self.pi_net = mlp(latent_dim, [mlp_dim, mlp_dim], action_dim)
        self.q = QEnsemble(latent_dim + action_dim, mlp_dim, num_q)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight)
                nn.init.zeros_(module.bias)
        # TD-MPC zeroes the reward output layer, so early value estimates start at 0.
        nn.init.zeros_(self.reward[-1].weight)

    def encode(self, obs: th.Tensor) -> th.Tensor:
        """z = h(s)"""
        return forward_mlp(self.encoder, obs)

    def next_latent(self, z: th.Tensor, action: th.Tensor) -> th.Tensor:
        """z' = d(z, a)"""
        return forward_mlp(self.dynamics, th.cat([z, action], dim=-1))

    def predict_reward(self, z: th.Tensor, action: th.Tensor) -> th.Tensor:
        """r = R(z, a)"""
        return forward_mlp(self.reward, th.cat([z, action], dim=-1))

    def _fused_first_layer(self) -> tuple[th.Tensor, th.Tensor]:
        """
        The first layers of d and R (same input (z, a)) side by side, transposed: ``[latent + action,
        2 * mlp_dim]`` and its bias. Row-major, so that each input's row (the action's, read by the
        compiled kernels of :func:`add_narrow_matmul`) is contiguous.
        """
        d, r = self.dynamics[0], self.reward[0]
        return th.cat([d.weight.t(), r.weight.t()], dim=1), th.cat([d.bias, r.bias])

    def _next_from_hidden(self, hidden: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """d and R after their stacked first layer and its ELU, ``[N, 2 * mlp_dim]``."""
        width = self.dynamics[0].out_features
        z, r = hidden[:, :width], hidden[:, width:]
        # list(...)[2::2], not Sequential slicing, which builds a new module per call (on the planner's path)
        layers = list(zip(list(self.dynamics)[2::2], list(self.reward)[2::2], strict=True))
        *hidden_layers, (d_out, r_out) = layers
        for d_layer, r_layer in hidden_layers:
            z = affine_elu(z, d_layer.weight.t(), d_layer.bias)
            r = affine_elu(r, r_layer.weight.t(), r_layer.bias)
        return linear(z, d_out.weight, d_out.bias), linear(r, r_out.weight, r_out.bias)

    def _fast_next(self) -> bool:
        return (
            is_elu_mlp(self.dynamics)
            and is_elu_mlp(self.reward)
            and len(self.dynamics) == len(self.reward)
            and self.dynamics[0].out_features == self.reward[0].out_features
        )

    def next(self, z: th.Tensor, action: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """z' = d(z, a), r = R(z, a)"""
        za = th.cat([z, action], dim=-1)
        if not self._fast_next():
            return self.dynamics(za), self.reward(za)
        batch_shape = za.shape[:-1]
        weight_t, bias = self._fused_first_layer()
        z, r = self._next_from_hidden(affine_elu(za.reshape(-1, za.shape[-1]), weight_t, bias))
        # Explicit sizes: -1 is ambiguous for an empty batch (no policy trajectories, num_samples < 20).
        return z.reshape(*batch_shape, z.shape[-1]), r.reshape(*batch_shape, r.shape[-1])

    def rollout_return(self, z: th.Tensor, actions: th.Tensor, gamma: float) -> tuple[th.Tensor, th.Tensor]:
        """
        ``sum_t gamma^t R(z_t, a_t)`` and ``z_H`` of action sequences that all start from their
        environment's latent: the first layers' z-part at t = 0 is computed once per environment.

        :param z: Start latents ``[E, latent_dim]``
        :param actions: Action sequences ``[H, E, N, action_dim]``
        :return: Discounted reward sums ``[E, N, 1]`` and final latents ``[E, N, latent_dim]``
        """
        horizon, num_envs, num_seq, action_dim = actions.shape
        if not self._fast_next():
            return stepwise_return(self.next, z.unsqueeze(1).expand(num_envs, num_seq, -1), actions, gamma)
        value, discount = th.zeros((), device=z.device, dtype=z.dtype), 1.0
        weight_t, bias = self._fused_first_layer()
        latent_dim = z.shape[-1]
        # t = 0: W [z, a] + b = W_a a + (W_z z + b), with W_z z + b per environment.
        w_z, w_a = weight_t[:latent_dim], weight_t[latent_dim:]
        z_part = affine(z, w_z, bias)
        if chain_kernels_apply(z):  # the planner's: each thread through the whole horizon on its own rows
            d_layers, r_layers = transposed_layers(self.dynamics, 2), transposed_layers(self.reward, 2)
            rows = actions.reshape(horizon, num_envs * num_seq, action_dim)
            value, z = cpu_kernels.rollout_return(z_part, rows, w_z, w_a, bias, d_layers, r_layers, gamma)
            return value.view(num_envs, num_seq, 1), z.view(num_envs, num_seq, latent_dim)
        hidden = elu_(add_narrow_matmul(z_part.unsqueeze(1), actions[0], w_a).view(num_envs * num_seq, -1))
        for t in range(horizon):
            if t > 0:
                action = actions[t].reshape(num_envs * num_seq, action_dim)
                if compiling_for_cpu(z):  # the action's part fused into the ELU's kernel, no cat
                    hidden = elu_(add_narrow_matmul(affine(z, w_z, bias), action, w_a))
                else:
                    hidden = affine_elu(th.cat([z, action], dim=-1), weight_t, bias)
            z, reward = self._next_from_hidden(hidden)
            value, discount = value + discount * reward, discount * gamma
        return value.view(num_envs, num_seq, 1), z.view(num_envs, num_seq, latent_dim)

    def pi(self, z: th.Tensor, std: float = 0.0) -> th.Tensor:
        """
        a = tanh(pi(z)), plus Gaussian noise of scale ``std`` clipped to +-0.3, the result kept in
        (-1, 1) with a straight-through gradient (TD-MPC's ``TruncatedNormal.sample(clip=0.3)``).
        """
        mu = th.tanh(forward_mlp(self.pi_net, z))
        if std <= 0:
            return mu
        noisy = mu + policy_noise(mu.shape, std, mu)
        return noisy + (noisy.clamp(-1 + 1e-6, 1 - 1e-6) - noisy).detach()


def compile_options(device: th.device) -> dict[str, Any]:
    """Inductor options of the compiled planner and losses (``torch_compile=True``) on ``device``."""
    options: dict[str, Any] = {"fallback_random": True}  # eager's random draws
    if device.type == "cpu":
        # Kernels launched from C++, not Python: plan 1.26x -> 1.20x the floor (docs/performance.md).
        options["cpp_wrapper"] = True
        # a * b + c as one FMA: the polynomial exp of every ELU is a chain of them (update 1.39x ->
        # 1.29x, docs/performance.md); rounding moves by float tolerance only.
        options["cpp.enable_floating_point_contract_flag"] = "fast"
    return options


class TDMPCPolicy(BasePolicy):
    """
    TD-MPC policy: the world model, its EMA target, and the planner that acts with them.

    ``predict`` plans with MPPI over the latent model. The warm start (the previous plan's mean,
    shifted by one step) is carried per environment in predict's ``state``, so that training
    environments and evaluation environments never share it; it resets at ``episode_start``.

    :param observation_space: Observation space (1-D Box)
    :param action_space: Action space (Box)
    :param lr_schedule: Learning rate schedule (constant in TD-MPC)
    :param latent_dim: Size of the latent state
    :param mlp_dim: Width of the dynamics, reward, policy and Q networks
    :param enc_dim: Width of the state encoder
    :param num_q: Number of Q-functions
    :param gamma: Discount factor used by the planner's return estimate
    :param horizon: Largest planning horizon (the algorithm schedules ``planning_horizon`` up to it)
    :param planning_iterations: MPPI iterations per step
    :param num_samples: Action sequences sampled from the planner's Gaussian per iteration
    :param num_elites: Sequences kept to refit the Gaussian
    :param policy_fraction: Share of ``num_samples`` added as trajectories of the policy prior
    :param temperature: Softmax temperature over elite returns
    :param momentum: Weight of the previous mean when refitting
    :param min_std: Noise scale of the policy prior's actions (planning and TD targets)
    :param max_std: Initial standard deviation of the planner's Gaussian
    :param optimizer_class: Optimizer of the world model and of the policy prior
    :param optimizer_kwargs: Extra arguments for the optimizer
    :param torch_compile: Run the planner iteration and the update losses through ``torch.compile``
        (opt-in: compiling takes minutes and recompiles for each planning horizon; see
        docs/performance.md for what it gains on CPU)
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        latent_dim: int = 50,
        mlp_dim: int = 512,
        enc_dim: int = 256,
        num_q: int = 2,
        gamma: float = 0.99,
        horizon: int = 5,
        planning_iterations: int = 6,
        num_samples: int = 512,
        num_elites: int = 64,
        policy_fraction: float = 0.05,
        temperature: float = 0.5,
        momentum: float = 0.1,
        min_std: float = 0.05,
        max_std: float = 2.0,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        torch_compile: bool = False,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=True,
            normalize_images=False,
        )
        self.check_observation_space(observation_space)
        check_settings(
            ("latent_dim", latent_dim, latent_dim >= 1, ">= 1"),
            ("mlp_dim", mlp_dim, mlp_dim >= 1, ">= 1"),
            ("enc_dim", enc_dim, enc_dim >= 1, ">= 1"),
            ("num_q", num_q, num_q >= 1, ">= 1"),
        )
        self.latent_dim, self.mlp_dim, self.enc_dim, self.num_q = latent_dim, mlp_dim, enc_dim, num_q
        self.set_planner(
            gamma=gamma,
            horizon=horizon,
            planning_iterations=planning_iterations,
            num_samples=num_samples,
            num_elites=num_elites,
            policy_fraction=policy_fraction,
            temperature=temperature,
            momentum=momentum,
            min_std=min_std,
        )
        self.max_std = max_std
        # Scheduled by TDMPC from its step count; until then, its defaults' values at step 0.
        self.planning_horizon = 1
        self.std_floor = 0.5
        self.torch_compile = torch_compile
        self._compiled: dict[str, Callable[..., Any]] = {}

        self.action_dim = int(np.prod(action_space.shape))
        self.model = WorldModel(
            observation_space.shape[0],
            self.action_dim,
            latent_dim,
            mlp_dim,
            enc_dim,
            num_q,
            self.make_encoder(),
        )
        # The target network is only ever read through h (consistency targets) and Q (TD targets).
        self.target = nn.ModuleDict(
            {"encoder": copy.deepcopy(self.model.encoder), "q": copy.deepcopy(self.model.q)}
        )
        self.target.requires_grad_(False)

        lr = lr_schedule(1)
        model_params = [p for name, p in self.model.named_parameters() if not name.startswith("pi_net.")]
        optimizer_kwargs = dict(self.optimizer_kwargs)
        if self.optimizer_class in (th.optim.Adam, th.optim.AdamW) and not {"fused", "foreach"} & set(
            optimizer_kwargs
        ):
            # One fused kernel instead of a dozen passes per parameter: 3x faster on CPU, same update.
            optimizer_kwargs["fused"] = True
        self.optimizer = self.optimizer_class(model_params, lr=lr, **optimizer_kwargs)
        self.pi_optimizer = self.optimizer_class(self.model.pi_net.parameters(), lr=lr, **optimizer_kwargs)

    def set_planner(
        self,
        *,
        gamma: float,
        horizon: int,
        planning_iterations: int,
        num_samples: int,
        num_elites: int,
        policy_fraction: float,
        temperature: float,
        momentum: float,
        min_std: float,
    ) -> None:
        """Set the planner's settings (the constructor's arguments of those names); refuse invalid ones."""
        if num_elites > num_samples:
            raise ValueError(f"num_elites ({num_elites}) must not exceed num_samples ({num_samples})")
        check_settings(
            ("planning_iterations", planning_iterations, planning_iterations >= 1, ">= 1"),
            ("num_elites", num_elites, num_elites >= 1, ">= 1"),
            ("policy_fraction", policy_fraction, 0 <= policy_fraction <= 1, "in [0, 1]"),
            ("temperature", temperature, temperature > 0, "> 0"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("min_std", min_std, min_std >= 0, ">= 0"),
        )
        self.gamma = gamma
        self.horizon = horizon
        self.planning_iterations = planning_iterations
        self.num_samples = num_samples
        self.num_elites = num_elites
        self.policy_fraction = policy_fraction
        self.num_policy_trajectories = int(policy_fraction * num_samples)
        self.temperature = temperature
        self.momentum = momentum
        self.min_std = min_std

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        del data["normalize_images"]  # not a TDMPCPolicy argument: images are never normalized
        data.update(
            lr_schedule=self._dummy_schedule,  # as SB3's policies: the algorithm sets the learning rate
            latent_dim=self.latent_dim,
            mlp_dim=self.mlp_dim,
            enc_dim=self.enc_dim,
            num_q=self.num_q,
            gamma=self.gamma,
            horizon=self.horizon,
            planning_iterations=self.planning_iterations,
            num_samples=self.num_samples,
            num_elites=self.num_elites,
            policy_fraction=self.policy_fraction,
            temperature=self.temperature,
            momentum=self.momentum,
            min_std=self.min_std,
            max_std=self.max_std,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            torch_compile=self.torch_compile,
        )
        return data

    def save(self, path: str) -> None:
        """
        SB3's policy ``save`` (weights and constructor arguments), with the planning horizon and std
        floor the algorithm had scheduled: a policy loaded alone plans as this one does.
        """
        saved = {"state_dict": self.state_dict(), "data": self._get_constructor_parameters()}
        th.save({**saved, "planning_horizon": self.planning_horizon, "std_floor": self.std_floor}, path)

    @classmethod
    def load(cls, path: str, device: th.device | str = "auto") -> TDMPCPolicy:  # type: ignore[override]
        """A policy saved by :meth:`save`, on ``device``."""
        device = get_device(device)
        saved = th.load(path, map_location=device, weights_only=False)  # spaces are pickled, as SB3's
        policy = cls(**saved["data"])
        policy.load_state_dict(saved["state_dict"])
        policy.planning_horizon, policy.std_floor = saved["planning_horizon"], saved["std_floor"]
        return policy.to(device)

    @classmethod
    def check_observation_space(cls, observation_space: spaces.Space) -> None:
        """Raise a ValueError unless this policy can encode ``observation_space`` (MlpPolicy: a 1-D Box)."""
        if isinstance(observation_space, spaces.Box) and is_image_space(observation_space):
            raise ValueError(
                f"{cls.__name__} encodes flat (1-D) Box observations, got the image space "
                f"{observation_space}: use CnnPolicy for image observations"
            )
        if not (
            isinstance(observation_space, spaces.Box)
            and len(observation_space.shape) == 1
            and observation_space.shape[0] > 0
        ):
            raise ValueError(
                f"{cls.__name__} needs a non-empty 1-D Box observation space, got {observation_space}"
            )

    def make_encoder(self) -> nn.Module | None:
        """The encoder h of the world model; None: the state MLP (``enc_dim`` wide)."""
        return None

    def augment(self, obs: th.Tensor) -> th.Tensor:
        """Data augmentation of sampled observations in the model update (identity for states)."""
        return obs

    def compiled(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, or with ``torch_compile`` its ``torch.compile`` (static shapes, eager's random draws)."""
        if not self.torch_compile:
            return fn
        if name not in self._compiled:
            self._compiled[name] = th.compile(fn, dynamic=False, options=compile_options(self.device))
        return self._compiled[name]

    def target_encode(self, obs: th.Tensor) -> th.Tensor:
        """z = h_target(s), the consistency targets"""
        return forward_mlp(self.target.encoder, obs)

    def ema_parameter_pairs(self) -> tuple[list[th.Tensor], list[th.Tensor]]:
        """(online, target) parameters that the EMA update blends."""
        online = [*self.model.encoder.parameters(), *self.model.q.parameters()]
        return online, [*self.target.encoder.parameters(), *self.target.q.parameters()]

    # ------------------------------------------------------------------ planning

    def _rollout_return(self, z: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """``sum_t gamma^t R(z_t, a_t)`` ``[E, N, 1]`` and ``z_H [E, N, latent]`` from ``z_0 [E, latent]``."""
        rollout = getattr(self.model, "rollout_return", None)
        if rollout is not None:
            return rollout(z, actions, self.gamma)
        # Any model with TOLD's interface (encode, next, pi, q), e.g. a hand-made one in a test.
        value, z = stepwise_return(
            self.model.next, z.unsqueeze(1).expand(*actions.shape[1:3], -1), actions, self.gamma
        )
        return value.expand(*actions.shape[1:3], 1), z

    def plan(
        self, obs: th.Tensor, warm_start: th.Tensor | None = None, explore: bool = False
    ) -> tuple[th.Tensor, th.Tensor]:
        """
        Plan an action for each environment in one batch.

        :param obs: Observations ``[E, *observation_shape]`` (flat states, or images for CnnPolicy)
        :param warm_start: The previous step's plan means ``[E, H', A]`` (any H'), already zeroed for
            environments that start an episode; None plans from scratch.
        :param explore: Add exploration noise of the final planner std to the action
        :return: Actions in [-1, 1] ``[E, A]`` and this step's plan means ``[E, H, A]``
        """
        horizon, num_envs, action_dim = self.planning_horizon, obs.shape[0], self.action_dim
        z, pi_actions, pi_value, z_pi = self.compiled("policy_rollout", self._policy_rollout)(obs, horizon)
        discount = 1.0
        for _ in range(horizon):
            discount *= self.gamma  # gamma^H, as the returns accumulate it

        # Warm start from the previous plan, shifted by one step.
        mean = z.new_zeros(horizon, num_envs, action_dim)
        if warm_start is not None:
            shifted = warm_start.transpose(0, 1)[1:horizon]
            mean[: len(shifted)] = shifted
        std = th.full_like(mean, self.max_std)

        std_floor = th.tensor(self.std_floor, device=z.device)  # a tensor: no recompiles as it decays
        iteration = self.compiled("plan_iteration", self._plan_iteration)
        for _ in range(self.planning_iterations):
            mean, std, score, elite_actions = iteration(
                z, mean, std, std_floor, pi_actions, pi_value, z_pi, discount
            )

        # Act with one elite sequence drawn by score, as TD-MPC does.
        choice = th.multinomial(score[0, :, :, 0], 1)
        action = elite_actions[0].gather(1, choice[:, :, None].expand(-1, -1, action_dim)).squeeze(1)
        if explore:
            action = (action + std[0] * th.randn_like(action)).clamp(-1, 1)
        return action, mean.transpose(0, 1)

    def _policy_rollout(
        self, obs: th.Tensor, horizon: int
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """
        Encode the observations and roll out the policy prior's trajectories once: their actions,
        discounted rewards and final latents are the same in every planner iteration (only the
        noise of pi(z_H) is drawn anew).

        :return: z ``[E, latent]``, actions ``[H, E, P, A]``, returns ``[E, P, 1]``, z_H ``[E, P, latent]``
        """
        z, num_pi = self.model.encode(obs), self.num_policy_trajectories
        return z, *policy_rollout(self.model, z, num_pi, horizon, self.min_std, self.gamma)

    def _plan_iteration(
        self,
        z: th.Tensor,
        mean: th.Tensor,
        std: th.Tensor,
        std_floor: th.Tensor,
        pi_actions: th.Tensor,
        pi_value: th.Tensor,
        z_pi: th.Tensor,
        discount: float,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """One MPPI iteration: sample, score, refit. :return: mean, std, elite scores, elite actions"""
        horizon, num_envs, action_dim = mean.shape
        noise = th.randn(horizon, num_envs, self.num_samples, action_dim, device=z.device)
        sampled = (mean.unsqueeze(2) + std.unsqueeze(2) * noise).clamp(-1, 1)
        # The rollout reads the samples back from `actions` (compiled, a buffer: not recomputed per use).
        actions = th.cat([sampled, pi_actions], dim=2)
        # G = sum_t gamma^t R(z_t, a_t) + gamma^H min Q(z_H, pi(z_H)): samples, then policy trajectories
        value, z_end = self._rollout_return(z, actions[:, :, : self.num_samples])
        value, z_end = th.cat([value, pi_value], dim=1), th.cat([z_end, z_pi], dim=1)
        value = value + discount * min_q_of_policy(self.model, self.model.q, z_end, self.min_std)
        value = value.squeeze(-1).nan_to_num(0.0)

        elite_value, elite_idx = value.topk(self.num_elites, dim=1)
        elite_actions = actions.gather(2, elite_idx[None, :, :, None].expand(horizon, -1, -1, action_dim))
        # score_i ~ exp(temperature * G_i), normalised over the elites
        score = th.softmax(self.temperature * elite_value, dim=1)[None, :, :, None]
        new_mean = (score * elite_actions).sum(dim=2)
        new_std = (score * (elite_actions - new_mean.unsqueeze(2)) ** 2).sum(dim=2).sqrt()
        mean = self.momentum * mean + (1 - self.momentum) * new_mean
        std = new_std.clamp(min=std_floor).clamp(max=self.max_std)
        return mean, std, score, elite_actions

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        """
        Planned actions for a batch of (preprocessed) observations, as SB3 policies' ``forward``: each
        plan from scratch (``predict`` carries the warm start), never differentiated.

        :param obs: Observations ``[E, *observation_shape]``, float32
        :param deterministic: Plan without exploration noise
        :return: Actions in [-1, 1] ``[E, A]``
        """
        with th.no_grad():
            return self._predict(obs, deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        actions, _ = self.plan(observation, explore=not deterministic)  # type: ignore[arg-type]
        return actions

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        Plan actions, carrying the planner's warm start in ``state``.

        :param observation: The input observation(s)
        :param state: ``(plan_means,)`` returned by the previous call for the same environments, or None
        :param episode_start: Which environments start a new episode (their warm start is dropped)
        :param deterministic: Plan without exploration noise
        :return: The actions and the new state ``(plan_means,)`` of shape ``[n_envs, horizon, action_dim]``
        """
        self.set_training_mode(False)
        obs_tensor, vectorized_env = self.obs_to_tensor(observation)
        # float32, as the networks (float64 from gymnasium's MuJoCo, lists); images stay in [0, 255]
        obs_tensor = preprocess_obs(obs_tensor, self.observation_space, self.normalize_images)
        if not bool(th.isfinite(obs_tensor).all()):  # the planner would score NaN returns as 0 and act
            raise ValueError(f"Non-finite observation given to predict: {observation}")
        warm_start = None
        if state is not None:
            plan_means = np.array(state[0], dtype=np.float32, copy=True)
            if plan_means.ndim != 3 or plan_means.shape[2] != self.action_dim:
                raise ValueError(
                    "state must be (plan_means,) as predict returned it, "
                    f"[n_envs, horizon, {self.action_dim}]; got an array of shape {plan_means.shape}"
                )
            if len(plan_means) != len(obs_tensor):
                raise ValueError(f"state holds {len(plan_means)} environments, observation {len(obs_tensor)}")
            if not np.isfinite(plan_means).all():  # a NaN warm start would make every sample NaN
                raise ValueError("Non-finite plan means in predict's state")
            if episode_start is not None:
                plan_means[np.asarray(episode_start, dtype=bool).reshape(-1)] = 0.0
            warm_start = th.as_tensor(plan_means, device=self.device)
        with th.inference_mode():
            actions, plan_means = self.plan(obs_tensor, warm_start, explore=not deterministic)  # type: ignore[arg-type]
        actions_np = self.unscale_action(actions.cpu().numpy().reshape((-1, *self.action_space.shape)))
        if not vectorized_env:
            actions_np = actions_np.squeeze(axis=0)
        return actions_np, (plan_means.cpu().numpy(),)


MlpPolicy = TDMPCPolicy


class CnnPolicy(TDMPCPolicy):
    """
    TD-MPC policy for image observations: channels-first uint8 frames stacked along the channels
    (e.g. ``(9, 84, 84)``), encoded by :class:`PixelEncoder` (``enc_dim`` is unused) and augmented by
    :class:`RandomShift` in the model update (never in planning).

    :param num_channels: Channels of the encoder's conv layers (TD-MPC: 32)
    :param shift_pad: Random shift in pixels (default: image size / 21, 4 for 84x84); 0 disables
    :param kwargs: As :class:`TDMPCPolicy`
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_channels: int = 32,
        shift_pad: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Read by make_encoder() during TDMPCPolicy.__init__.
        self.num_channels = num_channels
        self.shift_pad = int(observation_space.shape[-1] / 21) if shift_pad is None else shift_pad
        height, width = observation_space.shape[-2:]
        if self.shift_pad > 0 and height != width:
            raise ValueError(
                f"CnnPolicy's random shift augmentation needs square images, got {height}x{width}: "
                "give square frames, or policy_kwargs=dict(shift_pad=0) to train without it"
            )
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        self.shift = RandomShift(self.shift_pad)

    @classmethod
    def check_observation_space(cls, observation_space: spaces.Space) -> None:
        if not (
            isinstance(observation_space, spaces.Box)
            and is_image_space(observation_space, check_channels=False)
            and is_image_space_channels_first(observation_space)
        ):
            raise ValueError(
                f"{cls.__name__} needs channels-first uint8 images (C, H, W), got {observation_space}; "
                "use MlpPolicy for state observations"
            )

    def make_encoder(self) -> nn.Module:
        return PixelEncoder(self.observation_space, self.latent_dim, self.num_channels)  # type: ignore[arg-type]

    def augment(self, obs: th.Tensor) -> th.Tensor:
        return self.shift(obs) if self.shift_pad > 0 else obs

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {
            **super()._get_constructor_parameters(),
            "num_channels": self.num_channels,
            "shift_pad": self.shift_pad,
        }
