"""
The fast paths (fused layers, fast ELU/tanh, batched Q ensemble, batched targets, cached policy
trajectories) compute what a plain, straightforward TD-MPC computes: nn.Linear/nn.ELU modules on
``cat([z, a])``, Q1 and Q2 as two separate networks, the official per-step loss loop, every planner
iteration re-scoring the policy trajectories. Same outputs, losses, gradients and actions within
float tolerance, on small shapes.

The ``reference_*`` functions are also what ``benchmarks/speed.py`` counts the FLOP floor on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sb3_tdmpc import TDMPC
from sb3_tdmpc.common import cpu_kernels, fast_layers
from sb3_tdmpc.common.buffers import SequenceSamples
from sb3_tdmpc.tdmpc import policies
from sb3_tdmpc.tdmpc.policies import QEnsemble, TDMPCPolicy, WorldModel

SMALL = dict(latent_dim=8, mlp_dim=32, enc_dim=16)
ATOL = 1e-5


# --------------------------------------------------------------------------- plain reference


def reference_q(q: QEnsemble, z: th.Tensor, action: th.Tensor) -> list[th.Tensor]:
    """Each member as its own Linear-LayerNorm-Tanh-Linear-ELU-Linear network on cat([z, a])."""
    x = th.cat([z, action], dim=-1)
    values = []
    for m in range(q.num_q):
        h = x @ q.weights[0][m] + q.biases[0][m, 0]
        h = th.tanh(F.layer_norm(h, (q.hidden_dim,), q.norm_weight[m, 0], q.norm_bias[m, 0]))
        h = F.elu(h @ q.weights[1][m] + q.biases[1][m, 0])
        values.append(h @ q.weights[2][m] + q.biases[2][m, 0])
    return values


def reference_min_q(q: QEnsemble, z: th.Tensor, action: th.Tensor) -> th.Tensor:
    q1, q2 = reference_q(q, z, action)
    return th.min(q1, q2)


def reference_next(model: WorldModel, z: th.Tensor, action: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    za = th.cat([z, action], dim=-1)
    return model.dynamics(za), model.reward(za)


def reference_pi(model: WorldModel, z: th.Tensor, std: float, eps: th.Tensor | None = None) -> th.Tensor:
    """TD-MPC's pi with its TruncatedNormal(clip=0.3) noise; ``eps`` replaces the standard normal draw."""
    mu = th.tanh(model.pi_net(z))
    if std <= 0:
        return mu
    eps = th.randn_like(mu) if eps is None else eps
    noisy = mu + (eps * std).clamp(-0.3, 0.3)
    return noisy + (noisy.clamp(-1 + 1e-6, 1 - 1e-6) - noisy).detach()


def reference_plan(
    policy: TDMPCPolicy, obs: th.Tensor, warm_start: th.Tensor | None = None, explore: bool = False
) -> tuple[th.Tensor, th.Tensor]:
    """The official planner loop: every iteration re-estimates all samples and policy trajectories."""
    model, horizon, num_envs = policy.model, policy.planning_horizon, obs.shape[0]
    num_samples, num_pi, action_dim = policy.num_samples, policy.num_policy_trajectories, policy.action_dim
    z = model.encoder(obs)
    pi_actions = th.empty(horizon, num_envs, num_pi, action_dim)
    z_pi = z.unsqueeze(1).repeat(1, num_pi, 1)
    for t in range(horizon):
        pi_actions[t] = reference_pi(model, z_pi, policy.min_std)
        z_pi, _ = reference_next(model, z_pi, pi_actions[t])
    mean = th.zeros(horizon, num_envs, action_dim)
    if warm_start is not None:
        shifted = warm_start.transpose(0, 1)[1:horizon]
        mean[: len(shifted)] = shifted
    std = th.full_like(mean, policy.max_std)
    z = z.unsqueeze(1).repeat(1, num_samples + num_pi, 1)
    for _ in range(policy.planning_iterations):
        noise = th.randn(horizon, num_envs, num_samples, action_dim)
        actions = th.cat([(mean.unsqueeze(2) + std.unsqueeze(2) * noise).clamp(-1, 1), pi_actions], dim=2)
        value, discount, z_t = 0.0, 1.0, z
        for t in range(horizon):
            z_t, reward = reference_next(model, z_t, actions[t])
            value = value + discount * reward
            discount *= policy.gamma
        value = value + discount * reference_min_q(model.q, z_t, reference_pi(model, z_t, policy.min_std))
        value = value.squeeze(-1).nan_to_num(0.0)
        elite_value, elite_idx = value.topk(policy.num_elites, dim=1)
        elite_actions = th.stack([actions[:, e, elite_idx[e]] for e in range(num_envs)], dim=1)
        score = th.softmax(policy.temperature * elite_value, dim=1)[None, :, :, None]
        new_mean = (score * elite_actions).sum(dim=2)
        new_std = th.sqrt((score * (elite_actions - new_mean.unsqueeze(2)) ** 2).sum(dim=2))
        mean = policy.momentum * mean + (1 - policy.momentum) * new_mean
        std = new_std.clamp(policy.std_floor, policy.max_std)
    choice = th.multinomial(score[0, :, :, 0], 1)[:, 0]
    action = elite_actions[0, th.arange(num_envs), choice]
    if explore:
        action = (action + std[0] * th.randn_like(action)).clamp(-1, 1)
    return action, mean.transpose(0, 1)


def reference_model_losses(
    algo: TDMPC, data: SequenceSamples, td_eps: th.Tensor
) -> tuple[th.Tensor, dict[str, th.Tensor], th.Tensor, th.Tensor]:
    """
    The official per-step TOLD loss loop (with this package's masks and terminals, docs/algorithm.md).

    :param td_eps: The standard normal draws of pi's noise in the TD targets ``[H, B, A]``
    :return: The loss, the per-sequence loss terms, the new priorities and the latents ``z_0..z_H``
    """
    model, target, policy = algo.policy.model, algo.policy.target, algo.policy
    obs, actions, rewards, terminals, masks = data[:5]
    horizon = actions.shape[0]
    z = model.encoder(obs[0])
    latents = [z.detach()]
    consistency, reward_loss, value_loss, priority = 0.0, 0.0, 0.0, 0.0
    for t in range(horizon):
        q1, q2 = reference_q(model.q, z, actions[t])
        z, reward_pred = reference_next(model, z, actions[t])
        latents.append(z.detach())
        with th.no_grad():
            next_obs = obs[t + 1]
            next_z = target.encoder(next_obs)
            z_online = model.encoder(next_obs)
            next_q = reference_min_q(
                target.q, z_online, reference_pi(model, z_online, policy.min_std, td_eps[t])
            )
            td_target = rewards[t] + algo.gamma * (1 - terminals[t]) * next_q
        rho = algo.rho**t * masks[t]
        consistency = consistency + rho * th.mean((z - next_z) ** 2, dim=1, keepdim=True)
        reward_loss = reward_loss + rho * (reward_pred - rewards[t]) ** 2
        value_loss = value_loss + rho * ((q1 - td_target) ** 2 + (q2 - td_target) ** 2)
        priority = priority + rho * ((q1 - td_target).abs() + (q2 - td_target).abs())
    total = (
        algo.consistency_coef * consistency.clamp(max=1e4)
        + algo.reward_coef * reward_loss.clamp(max=1e4)
        + algo.value_coef * value_loss.clamp(max=1e4)
    )
    loss = (total.squeeze(1) * data.weights).mean() / horizon
    terms = {"consistency_loss": consistency, "reward_loss": reward_loss, "value_loss": value_loss}
    return loss, terms, priority.clamp(max=1e4).squeeze(-1), th.stack(latents)


def reference_pi_loss(algo: TDMPC, latents: th.Tensor, masks: th.Tensor, pi_eps: th.Tensor) -> th.Tensor:
    """The official policy loss -sum_t rho^t min Q(z_t, pi(z_t)), over valid latents, Q frozen."""
    model, loss = algo.policy.model, 0.0
    valid = th.cat([th.ones_like(masks[:1]), masks])
    model.q.requires_grad_(False)
    for t, z in enumerate(latents):
        q = reference_min_q(model.q, z, reference_pi(model, z, algo.policy.min_std, pi_eps[t]))
        loss = loss - (algo.rho**t * valid[t] * q).mean()
    model.q.requires_grad_(True)
    return loss


def reference_update(algo: TDMPC, data: SequenceSamples) -> None:
    """One full reference update (world model step, then policy prior step), for FLOP counting."""
    policy, horizon = algo.policy, data.actions.shape[0]
    td_eps = th.randn(horizon, *data.actions.shape[1:])
    loss, _, _, latents = reference_model_losses(algo, data, td_eps)
    policy.optimizer.zero_grad()
    loss.backward()
    pi_eps = th.randn(horizon + 1, *data.actions.shape[1:])
    pi_loss = reference_pi_loss(algo, latents, data.masks, pi_eps)
    policy.pi_optimizer.zero_grad()
    pi_loss.backward()


# --------------------------------------------------------------------------- helpers


def make_policy(**kwargs) -> TDMPCPolicy:
    th.manual_seed(0)
    policy = TDMPCPolicy(
        spaces.Box(-1, 1, (6,)), spaces.Box(-1, 1, (3,)), lambda _: 1e-3, **{**SMALL, **kwargs}
    )
    randomize(policy)
    return policy


def randomize(policy: TDMPCPolicy) -> None:
    """Give the zero-initialised layers (reward and Q outputs, biases) values, so that they are tested."""
    with th.no_grad():
        for name, p in policy.named_parameters():
            if p.dim() == 1 or "bias" in name or "norm" in name or p.abs().sum() == 0:
                p.copy_(th.randn_like(p) * 0.3 + (1.0 if "norm_weight" in name else 0.0))
        policy.target.load_state_dict({k: v * 0.9 for k, v in policy.target.state_dict().items()})


def make_algo(**policy_kwargs) -> TDMPC:
    algo = TDMPC(
        "Pendulum-v1",
        policy_kwargs={**SMALL, **policy_kwargs},
        buffer_size=100,
        batch_size=16,
        learning_starts=0,
        seed=0,
    )
    randomize(algo.policy)
    algo.replay_buffer.update_priorities = lambda indices, priorities: setattr(
        algo, "_priorities", priorities
    )
    return algo


def make_batch(horizon: int = 3, batch: int = 16, obs_dim: int = 3, action_dim: int = 1) -> SequenceSamples:
    gen = th.Generator().manual_seed(1)
    masks = th.ones(horizon, batch, 1)
    masks[2:, :3] = 0  # episodes that end inside the sequence
    terminals = th.zeros(horizon, batch, 1)
    terminals[1, :3] = 1
    return SequenceSamples(
        observations=th.randn(horizon + 1, batch, obs_dim, generator=gen),
        actions=th.rand(horizon, batch, action_dim, generator=gen) * 2 - 1,
        rewards=th.randn(horizon, batch, 1, generator=gen),
        terminals=terminals,
        masks=masks,
        weights=th.rand(batch, generator=gen) * 0.5 + 0.5,
        indices=np.arange(batch),
    )


def close(a: th.Tensor, b: th.Tensor, atol: float = ATOL, rtol: float = 1e-4) -> bool:
    return a.shape == b.shape and th.allclose(a, b, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- tests


@pytest.fixture(params=["cpu kernels", "pytorch ops"])
def cpu_kernel_path(request, monkeypatch):
    """Linear-ELU layers and Q's LayerNorm-tanh by the fused CPU kernels (where they build) or PyTorch ops."""
    if request.param == "pytorch ops":
        monkeypatch.setattr(fast_layers, "cpu_kernels_apply", lambda x: False)
    elif not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    return request.param


@pytest.mark.parametrize("batch_shape", [(7,), (3, 5), (2, 4, 6)])
def test_networks_match_the_plain_modules(batch_shape, cpu_kernel_path):
    policy = make_policy()
    model = policy.model
    obs, z, a = th.randn(*batch_shape, 6), th.randn(*batch_shape, 8), th.rand(*batch_shape, 3) * 2 - 1
    for grad in (False, True):
        with th.set_grad_enabled(grad):
            assert close(model.encode(obs), model.encoder(obs))
            assert close(policy.target_encode(obs), policy.target.encoder(obs))
            fast, ref = model.next(z, a), reference_next(model, z, a)
            assert close(fast[0], ref[0]) and close(fast[1], ref[1])
            assert close(model.next_latent(z, a), ref[0]) and close(model.predict_reward(z, a), ref[1])
            assert close(model.pi(z), reference_pi(model, z, 0.0))
            assert close(model.q(z, a), th.stack(reference_q(model.q, z, a)))


def gradients(loss: th.Tensor, tensors: list[th.Tensor]) -> list[th.Tensor]:
    return list(th.autograd.grad(loss, tensors, allow_unused=True))


def test_gradients_match_the_plain_modules(cpu_kernel_path):
    policy = make_policy()
    model = policy.model
    params = [p for p in model.parameters() if p.requires_grad]
    z = th.randn(4, 5, 8, requires_grad=True)
    a = (th.rand(4, 5, 3) * 2 - 1).requires_grad_(True)
    obs = th.randn(4, 5, 6, requires_grad=True)
    weights = th.randn(4, 5, 1)

    def objective(enc, nxt, pi, q):
        z1, r = nxt(z, a)
        return (
            (weights * (enc(obs).sum(-1, keepdim=True) + z1.sum(-1, keepdim=True) + r)).sum()
            + (weights * pi(z).sum(-1, keepdim=True)).sum()
            + (q(z, a) * weights).sum()
        )

    fast = objective(model.encode, model.next, model.pi, model.q)
    ref = objective(
        model.encoder, lambda z, a: reference_next(model, z, a), lambda z: reference_pi(model, z, 0.0),
        lambda z, a: th.stack(reference_q(model.q, z, a)),
    )  # fmt: skip
    assert close(fast, ref)
    for g_fast, g_ref in zip(
        gradients(fast, [obs, z, a, *params]), gradients(ref, [obs, z, a, *params]), strict=True
    ):
        assert close(g_fast, g_ref, atol=1e-4)
    # The policy update's path: gradient through the action only (z detached, Q frozen).
    model.q.requires_grad_(False)
    a_fast = gradients(model.q(z.detach(), a).sum(), [a])[0]
    a_ref = gradients(th.stack(reference_q(model.q, z.detach(), a)).sum(), [a])[0]
    assert close(a_fast, a_ref)


def capture_gradients(optimizer: th.optim.Optimizer) -> list[th.Tensor]:
    """Snapshot the (clipped) gradients each time ``optimizer.step`` runs."""
    captured: list[th.Tensor] = []
    step = optimizer.step

    def capturing_step(*args, **kwargs):
        captured[:] = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
        return step(*args, **kwargs)

    optimizer.step = capturing_step
    return captured


def test_world_model_update_matches_the_official_loss_loop():
    algo = make_algo()
    data = make_batch()
    policy = algo.policy
    params = [p for group in policy.optimizer.param_groups for p in group["params"]]
    grads = capture_gradients(policy.optimizer)
    before = [p.detach().clone() for p in params]

    # The fast path draws pi's noise in the TD targets as one [H, B, A] block: the reference uses that draw.
    th.manual_seed(5)
    td_eps = th.randn(*data.actions.shape)
    th.manual_seed(5)
    stats, latents = algo._update_world_model(data)

    with th.no_grad():
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
    loss, terms, priorities, ref_latents = reference_model_losses(algo, data, td_eps)
    policy.optimizer.zero_grad()
    loss.backward()
    th.nn.utils.clip_grad_norm_(params, algo.max_grad_norm)

    assert close(stats["loss"], loss.detach())
    for key, value in terms.items():
        assert close(stats[key], value.detach().mean()), key
    assert close(th.as_tensor(algo._priorities).reshape(-1), priorities.detach())
    assert close(latents, ref_latents)
    assert len(grads) == len(params)
    for g_fast, p in zip(grads, params, strict=True):
        assert close(g_fast, p.grad, atol=1e-4)


def test_policy_prior_update_matches_the_official_loss_loop():
    algo = make_algo()
    data = make_batch()
    latents = th.randn(data.actions.shape[0] + 1, 16, 8)
    pi_params = list(algo.policy.model.pi_net.parameters())
    grads = capture_gradients(algo.policy.pi_optimizer)
    before = [p.detach().clone() for p in pi_params]

    th.manual_seed(7)
    pi_eps = th.randn(*latents.shape[:2], 1)
    th.manual_seed(7)
    pi_loss = algo._update_policy_prior(latents, data.masks)

    with th.no_grad():
        for p, b in zip(pi_params, before, strict=True):
            p.copy_(b)
    ref = reference_pi_loss(algo, latents, data.masks, pi_eps)
    algo.policy.pi_optimizer.zero_grad()
    ref.backward()
    th.nn.utils.clip_grad_norm_(pi_params, algo.max_grad_norm)
    assert close(pi_loss, ref.detach())
    for g_fast, p in zip(grads, pi_params, strict=True):
        assert close(g_fast, p.grad, atol=1e-4)


@pytest.mark.parametrize("horizon, num_envs, warm", [(3, 2, True), (1, 1, False), (4, 3, False)])
def test_planner_matches_the_official_loop(horizon, num_envs, warm):
    """Same seed, same random draws in the same order: same actions and plan means."""
    policy = make_policy(num_samples=40, num_elites=6, planning_iterations=3, policy_fraction=0.1)
    policy.planning_horizon, policy.std_floor = horizon, 0.1
    obs = th.randn(num_envs, 6)
    warm_start = (th.rand(num_envs, 5, 3) * 2 - 1) if warm else None
    for explore in (False, True):
        with th.no_grad():
            th.manual_seed(11)
            action, mean = policy.plan(obs, warm_start, explore)
            th.manual_seed(11)
            ref_action, ref_mean = reference_plan(policy, obs, warm_start, explore)
        assert close(action, ref_action) and close(mean, ref_mean)


def kernel_flops(fn, op) -> tuple[int, int]:
    """(all FLOPs counted in ``fn()``, those of the fused op ``op``)."""
    with FlopCounterMode(display=False) as flops:
        fn()
    return flops.get_total_flops(), flops.get_flop_counts()["Global"].get(op, 0)


# 2 x 9 rows: one block per thread; 3 x 250: several. mlp_dim 37: vectorised parts and tails.
@pytest.mark.parametrize("num_envs, num_seq, mlp_dim", [(2, 9, 32), (3, 250, 37)])
def test_planner_value_estimates_match(num_envs, num_seq, mlp_dim, cpu_kernel_path):
    """
    The planner's returns: the fast rollout (first layer shared at t = 0; on CPU one fused call, each
    thread through the whole horizon; with a gradient layer by layer) against a per-step loop, and the
    kernel's FLOPs those of the ops.
    """
    policy = make_policy(mlp_dim=mlp_dim)
    z = th.randn(num_envs, 8)
    actions = (th.rand(4, num_envs, num_seq + 2, 3) * 2 - 1)[:, :, :num_seq]  # as the planner's, a view
    with th.no_grad():
        value, z_end = policy.model.rollout_return(z, actions, policy.gamma)
        ref_value, ref_z = 0.0, z.unsqueeze(1).expand(num_envs, num_seq, 8)
        for t in range(4):
            ref_z, reward = reference_next(policy.model, ref_z, actions[t])
            ref_value = ref_value + policy.gamma**t * reward
        total, fused = kernel_flops(
            lambda: policy.model.rollout_return(z, actions, policy.gamma), th.ops.sb3_tdmpc_cpu.rollout_return
        )
    assert close(value, ref_value) and close(z_end, ref_z)
    assert (fused > 0) == (cpu_kernel_path == "cpu kernels")
    with_grad = policy.model.rollout_return(z, actions, policy.gamma)  # layer by layer, differentiable
    assert with_grad[0].requires_grad and close(with_grad[0], ref_value) and close(with_grad[1], ref_z)
    with th.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(policies, "chain_kernels_apply", lambda x: False)  # layer by layer
        assert kernel_flops(lambda: policy.model.rollout_return(z, actions, policy.gamma), None)[0] == total


@pytest.mark.parametrize("batch_shape, std", [((7,), 0.0), ((3, 5), 0.3), ((600,), 0.3)])
def test_min_q_of_policy_matches_the_plain_modules(batch_shape, std, cpu_kernel_path):
    """
    min_i Q_i(z, pi(z)) of the planner and the TD targets (another ensemble's Q, pi's noise drawn the
    same): on CPU with no gradient one fused call; a NaN in z makes its value NaN; FLOPs those of the ops.
    """
    policy = make_policy(mlp_dim=37)
    model, target_q = policy.model, make_policy(mlp_dim=37).model.q
    with th.no_grad():
        target_q.weights[0].add_(0.5)  # not the model's own
        z = th.randn(*batch_shape, 8)
        z[(0,) * len(batch_shape)][2] = float("nan")
        th.manual_seed(5)
        got = policies.min_q_of_policy(model, target_q, z, std)
        total, fused = kernel_flops(
            lambda: policies.min_q_of_policy(model, target_q, z, std), th.ops.sb3_tdmpc_cpu.min_q_of_policy
        )
        th.manual_seed(5)
        eps = th.randn(*batch_shape, 3)
        want = reference_min_q(target_q, z, reference_pi(model, z, std, eps))
    assert got.shape == want.shape and got.flatten()[0].isnan() and want.flatten()[0].isnan()
    assert close(got.flatten()[1:], want.flatten()[1:])
    assert (fused > 0) == (cpu_kernel_path == "cpu kernels")
    with th.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(policies, "chain_kernels_apply", lambda x: False)
        assert kernel_flops(lambda: policies.min_q_of_policy(model, target_q, z, std), None)[0] == total


# 2 x 9 rows: one block per thread; 3 x 250: several. std 0: no noise. mlp_dim 37: vectorised parts and tails.
@pytest.mark.parametrize("num_envs, num_seq, std", [(2, 9, 0.0), (2, 9, 0.3), (3, 250, 0.3)])
def test_policy_trajectories_match_a_per_step_loop(num_envs, num_seq, std, cpu_kernel_path):
    """
    The planner's policy prior trajectories (on CPU with no gradient one fused call, each thread through
    the whole horizon) against the official per-step loop with the same noise; FLOPs those of the ops.
    """
    policy = make_policy(mlp_dim=37)
    model, z = policy.model, th.randn(num_envs, 8)

    def rollout() -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        return policies.policy_rollout(model, z, num_seq, 4, std, policy.gamma)

    with th.no_grad():
        th.manual_seed(3)
        actions, value, z_end = rollout()
        total, fused = kernel_flops(rollout, th.ops.sb3_tdmpc_cpu.policy_rollout)
        th.manual_seed(3)
        ref_value, ref_z, ref_actions = 0.0, z.unsqueeze(1).repeat(1, num_seq, 1), []
        for t in range(4):
            ref_actions.append(reference_pi(model, ref_z, std))
            ref_z, reward = reference_next(model, ref_z, ref_actions[-1])
            ref_value = ref_value + policy.gamma**t * reward
    assert close(actions, th.stack(ref_actions)) and close(value, ref_value) and close(z_end, ref_z)
    assert (fused > 0) == (cpu_kernel_path == "cpu kernels")
    with th.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(policies, "chain_kernels_apply", lambda x: False)  # step by step
        assert kernel_flops(rollout, None)[0] == total


def test_chain_kernels_reject_mismatched_shapes():
    """The fused calls check their inputs: a clear error, not a wrong result."""
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    model = make_policy().model
    weight_t, bias = model._fused_first_layer()
    d, r = fast_layers.transposed_layers(model.dynamics, 2), fast_layers.transposed_layers(model.reward, 2)
    z_part, actions, w_z = th.zeros(1, 64), th.zeros(2, 5, 3), weight_t[:8]
    with pytest.raises(RuntimeError, match="first layer's shapes do not match"):
        cpu_kernels.rollout_return(z_part, actions, w_z, weight_t[8:10], bias, d, r, 0.99)
    with pytest.raises(RuntimeError, match="d must end in the latent"):
        cpu_kernels.rollout_return(z_part, actions, w_z, weight_t[8:], bias, r, r, 0.99)
    pi = fast_layers.transposed_layers(model.pi_net)
    q = list(model.q.weights), list(model.q.biases), model.q.norm_weight, model.q.norm_bias
    with pytest.raises(RuntimeError, match="action_noise's shape does not match"):
        cpu_kernels.min_q_of_policy(th.zeros(4, 8), pi, th.zeros(4, 2), *q)
    first_layer = w_z, weight_t[8:], bias
    with pytest.raises(RuntimeError, match="action_noise's shape does not match"):
        cpu_kernels.policy_rollout(th.zeros(2, 8), 3, 5, pi, th.zeros(5, 6, 2), *first_layer, d, r, 0.99)
    with pytest.raises(RuntimeError, match="pi's layer 1's shapes do not match"):
        cpu_kernels.policy_rollout(th.zeros(2, 9), 3, 5, pi, None, *first_layer, d, r, 0.99)
    with pytest.raises(RuntimeError, match="Q's layer 1's shapes do not match"):
        cpu_kernels.min_q_of_policy(th.zeros(4, 8), pi, None, [q[0][0][:, :10], *q[0][1:]], *q[1:])


def test_rows_do_not_depend_on_the_threads_shares():
    """
    The per-thread kernels split their rows by the threads' measured speeds (row_blocks.h): shares
    far from equal give the same bits as equal ones, so results do not depend on the timing.
    """
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    th.set_num_threads(2)  # the suite runs on one (conftest restores it)
    model = make_policy(mlp_dim=64).model
    gen = th.Generator().manual_seed(0)
    z, actions, latents = th.randn(1, 8, generator=gen), th.rand(4, 1, 600, 3) * 2 - 1, th.randn(600, 8)
    x, weight, bias = th.randn(2600, 24, generator=gen), th.randn(24, 40, generator=gen), th.randn(40)
    calls = [  # over enough rows to be balanced
        lambda: model.rollout_return(z, actions, 0.99),
        lambda: (policies.min_q_of_policy(model, model.q, latents, 0.0),),
        lambda: (cpu_kernels.linear_elu(x, weight, bias),),
        lambda: (cpu_kernels.mm(x, weight),),
    ]
    shares = cpu_kernels.thread_shares
    saved = shares()
    fast_first = [1.5, 0.5]
    try:
        with th.no_grad():
            shares(balance=False)
            equal = [call() for call in calls]
            for speeds in (fast_first, fast_first[::-1]):
                for call, expected in zip(calls, equal, strict=True):
                    shares(speeds, balance=True)  # each call measures the speeds again
                    assert all(th.equal(a, b) for a, b in zip(call(), expected, strict=True))
        assert all(0.5 <= speed <= 1.5 for speed in shares())
    finally:
        shares(saved, balance=True)


def test_reference_flop_counts_are_the_issues():
    """The plain reference costs 25.35 GFLOP per plan and 35.29 GFLOP per update at the paper settings."""
    algo = TDMPC("reach-v3", buffer_size=100, batch_size=512, learning_starts=0, seed=0)
    policy = algo.policy
    policy.planning_horizon = 5
    data = SequenceSamples(
        th.randn(6, 512, 39), th.rand(5, 512, 4) * 2 - 1, th.randn(5, 512, 1), th.zeros(5, 512, 1),
        th.ones(5, 512, 1), th.ones(512), np.arange(512),
    )  # fmt: skip
    with FlopCounterMode(display=False) as plan_flops, th.no_grad():
        reference_plan(policy, th.randn(1, 39))
    with FlopCounterMode(display=False) as update_flops:
        reference_update(algo, data)
    assert plan_flops.get_total_flops() == 25_348_300_288
    assert update_flops.get_total_flops() == 35_289_825_280


def test_frozen_q_backward_matches_autograd_over_the_rows_min_q_reaches():
    """
    The policy prior step's Q (frozen, differentiated with respect to the action) runs each member's
    backward in 512-row blocks over the rows that min(Q1, Q2)'s gradient reaches: autograd's action
    gradient, with rows that no gradient reaches (zero weight) among them.
    """
    th.manual_seed(0)
    q = QEnsemble(8 + 3, 16)
    for parameter in q.parameters():
        th.nn.init.normal_(parameter, std=0.3)
    q.requires_grad_(False)
    z, a = th.randn(2600, 8), (th.rand(2600, 3) * 2 - 1).requires_grad_(True)  # ~1000 rows per member
    weights = th.rand(2600, 1)
    weights[::4] = 0.0
    fast = (q(z, a).min(dim=0).values * weights).sum()
    ref = (reference_min_q(q, z, a) * weights).sum()
    assert close(fast, ref)
    grad_fast, grad_ref = gradients(fast, [a])[0], gradients(ref, [a])[0]
    assert close(grad_fast, grad_ref) and (grad_fast[::4] == 0).all()


def test_policy_prior_step_skips_the_q_rows_min_q_does_not_reach(monkeypatch):
    """Fewer FLOPs than the Q backward over all rows, and the same policy gradient."""
    latents, masks = th.randn(4, 16, 8), make_batch().masks
    counts, gradients_per_run = [], []
    for all_rows in (False, True):
        if all_rows:
            monkeypatch.setattr(fast_layers, "reached_rows", lambda grad: th.arange(len(grad)))
        algo = make_algo()
        grads = capture_gradients(algo.policy.pi_optimizer)
        th.manual_seed(7)
        with FlopCounterMode(display=False) as counter:
            algo._update_policy_prior(latents, masks)
        counts.append(counter.get_total_flops())
        gradients_per_run.append(grads)
    assert counts[0] < counts[1]
    assert all(close(a, b) for a, b in zip(*gradients_per_run, strict=True))


@pytest.mark.parametrize("n_in, n_out", [(54, 512), (512, 50), (64, 64), (512, 4)])
@pytest.mark.parametrize("column_major", [True, False])
def test_weight_gradient_is_x_t_grad_in_the_weights_layout(n_in, n_out, column_major):
    """
    A layer's weight gradient ``x^T grad``, computed with its narrow side as rows whatever the weight's
    layout, arrives with the weight's own strides (an nn.Linear weight's ``weight.t()``, or Q's
    ``[in, out]``).
    """
    th.manual_seed(0)
    x, grad = th.randn(300, n_in), th.randn(300, n_out)
    weight_t = th.randn(n_out, n_in).t() if column_major else th.randn(n_in, n_out)
    result = fast_layers._weight_gradient(grad, x, weight_t)
    assert result.stride() == weight_t.stride()
    assert close(result, x.double().t().mm(grad.double()).float(), atol=1e-4)  # sums of 300 products


@pytest.mark.parametrize("rows", [1, 37, 2600])  # 2600: each thread's own row blocks
def test_fused_linear_elu_kernel_matches_pytorch(rows, monkeypatch):
    """The fused CPU kernels: F.elu(F.linear) values, gradients (weights' in their own layout), FLOPs."""
    monkeypatch.setattr(cpu_kernels, "_loaded", None)  # built or loaded inside a FLOP counter
    with FlopCounterMode(display=False) as flops:
        fast_layers.affine_elu(th.zeros(rows, 24), th.zeros(24, 40), th.zeros(40))
    assert flops.get_total_flops() == 2 * rows * 24 * 40
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    gen = th.Generator().manual_seed(0)
    wide = th.randn(rows, 30, generator=gen)
    x = wide[:, 3:27].requires_grad_(True)  # rows 30 floats apart, as d's and R's halves of one tensor
    linear = nn.Linear(24, 40)  # its weight read transposed ([in, out], column-major)
    w_in_out = (th.randn(24, 40, generator=gen) / 5).requires_grad_(True)  # row-major, as Q's
    for weight_t, weight, bias in [
        (linear.weight.t(), linear.weight, linear.bias),
        (w_in_out, w_in_out, linear.bias),
    ]:
        with FlopCounterMode(display=False) as flops:
            fused = fast_layers.affine_elu(x, weight_t, bias)
        assert flops.get_flop_counts()["Global"] == {th.ops.sb3_tdmpc_cpu.linear_elu: 2 * rows * 24 * 40}
        expected = F.elu(x @ weight_t + bias)
        assert close(fused, expected)
        with th.no_grad():  # over 1024 rows, each thread's rows in one call (the default) or in blocks
            assert close(cpu_kernels.linear_elu(x, weight_t, bias, block_rows=128), expected)
        upstream = th.randn(rows, 40, generator=gen)
        with FlopCounterMode(display=False) as flops:
            got = gradients((fused * upstream).sum(), [x, weight, bias])
        assert (
            flops.get_flop_counts()["Global"][th.ops.sb3_tdmpc_cpu.mm] == 2 * rows * 40 * 24
        )  # input gradient
        want = gradients((expected * upstream).sum(), [x, weight, bias])
        assert all(close(g, w, atol=1e-4) for g, w in zip(got, want, strict=True))
        assert got[1].stride() == weight.stride()  # AccumulateGrad would copy any other layout
        with th.no_grad():
            assert close(fast_layers.affine_elu(x, weight_t, bias), expected)
            # ELU(NaN) = NaN, ELU(inf) = inf, ELU(-inf) = -1, in the vectorised part and in the tail
            nan, inf = float("nan"), float("inf")
            special = th.tensor([nan] * 8 + [inf] * 8 + [-inf] * 8 + [0.0] * 16 + [nan, inf, -inf])
            got = fast_layers.affine_elu(th.zeros(2, 24), th.zeros(24, 43), special)
            assert th.equal(got.isnan(), special.isnan().expand(2, -1))
            assert th.equal(got.nan_to_num(0.0), F.elu(special).nan_to_num(0.0).expand(2, -1))


@pytest.mark.parametrize("rows", [1, 37, 2600])
def test_fused_elu_backward_matches_atens(rows):
    """
    The ELU backward kernel (from the output, with the bias gradient in the same pass, each thread
    summing its own rows) against ATen's elu_backward and a sum, with zero, infinite and -1 outputs;
    a NaN output gives a NaN gradient (ATen's vectorised and scalar paths differ there).
    """
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    gen = th.Generator().manual_seed(0)
    out = F.elu(th.randn(rows, 43, generator=gen) * 3)  # 43 columns: a vectorised part and a tail
    out[0, :3] = th.tensor([0.0, float("inf"), -1.0])
    grad = th.randn(rows, 43, generator=gen)
    got, got_bias = cpu_kernels.elu_backward_bias_grad(grad, out)
    want = th.ops.aten.elu_backward(grad, 1.0, 1, 1.0, True, out)
    assert close(got, want) and close(got_bias, want.sum(0), atol=1e-4)
    out[-1, 5], out[-1, 42] = float("nan"), float("nan")  # in the vectorised part and in the tail
    got, got_bias = cpu_kernels.elu_backward_bias_grad(grad, out)
    assert got.isnan().sum() == 2 and got[-1, [5, 42]].isnan().all() and got_bias[[5, 42]].isnan().all()


def test_fused_linear_elu_is_within_1e_7_of_elu():
    """The kernel's ELU (exp(x) - 1 by a polynomial exp) over [-90, 10], vectorised and scalar parts."""
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    values = th.linspace(-90.0, 10.0, 200_003)  # as the bias: ELU(0 @ W + b) = ELU(b)
    got = fast_layers.affine_elu(th.zeros(1, 8), th.zeros(8, len(values)), values)[0]
    assert (got.double() - F.elu(values.double())).abs().max() <= 1e-7


@pytest.mark.parametrize("rows", [1, 37, 2600])
def test_fused_layer_norm_tanh_kernel_matches_pytorch(rows):
    """
    tanh(LayerNorm) by the fused CPU kernels: values, native_layer_norm's statistics (after Q's first
    layer's bias and action part in the same pass, as in the policy step), gradients (input,
    weight, bias: the backward kernel, each thread summing its rows), in place without a gradient; a NaN
    or an infinity makes its row NaN, as ATen's, and a NaN gradient its row's input gradient.
    """
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    gen = th.Generator().manual_seed(0)
    wide = th.randn(rows, 45, generator=gen) * 3 + 1
    h = wide[:, 2:42].requires_grad_(True)  # rows 45 floats apart; 40 columns: a vectorised part and a tail
    weight = (th.randn(40, generator=gen) + 1).requires_grad_(True)
    bias = th.randn(40, generator=gen).requires_grad_(True)
    fused = fast_layers.layer_norm_tanh(h, weight, bias)
    assert type(fused.grad_fn).__name__ == "_LayerNormTanhBackward"  # the kernel's path, not PyTorch ops
    expected = th.tanh(F.layer_norm(h, (40,), weight, bias))
    assert close(fused, expected)
    upstream = th.randn(rows, 40, generator=gen)
    got = gradients((fused * upstream).sum(), [h, weight, bias])
    want = gradients((expected * upstream).sum(), [h, weight, bias])
    assert all(close(g, w, atol=1e-4) for g, w in zip(got, want, strict=True))
    upstream[0, 7] = float("nan")
    loss = (fast_layers.layer_norm_tanh(h, weight, bias) * upstream).sum()
    grad_h, grad_weight, _ = gradients(loss, [h, weight, bias])
    assert grad_h[0].isnan().all() and grad_h[1:].isfinite().all() and grad_weight.isnan().any()
    with th.no_grad():
        # Q's first layer in the policy step: h = z W_z + b1 + a W_a (from z W_z, overwritten), then above's.
        product, b1 = th.randn(rows, 40, generator=gen), th.randn(40, generator=gen)
        action, w_a = th.randn(rows, 4, generator=gen), th.randn(4, 40, generator=gen)
        first = product + b1 + action @ w_a
        h1, out, mean, rstd = fast_layers.first_layer_norm_tanh(product, b1, action, w_a, weight, bias)
        assert h1.data_ptr() == product.data_ptr() and close(h1, first)
        _, ref_mean, ref_rstd = th.native_layer_norm(first, [40], weight, bias, 1e-5)
        assert close(out, th.tanh(F.layer_norm(first, (40,), weight, bias)))
        assert close(mean, ref_mean) and close(rstd, ref_rstd)
        with FlopCounterMode(display=False) as flops:  # the rank-4 update, as the addmm it replaces
            fast_layers.first_layer_norm_tanh(product, b1, action, w_a, weight, bias)
        assert flops.get_total_flops() == 2 * rows * 4 * 40
        fresh = h.detach().clone()
        in_place = fast_layers.layer_norm_tanh(fresh, weight, bias)
        assert in_place.data_ptr() == fresh.data_ptr() and close(in_place, expected)
        special = th.zeros(4, 40)
        special[0, 3], special[1, 38], special[2, 5] = float("nan"), float("inf"), -float("inf")
        got = fast_layers.layer_norm_tanh(special, weight, bias)
        assert got[:3].isnan().all() and got[3].isfinite().all()


def test_fused_layer_norm_tanh_is_within_six_ulp_of_tanh():
    """The kernel's tanh (rational, as the compiled path's) over [-12, 12] and tiny values."""
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    tiny = th.logspace(-30, 1, 10_001)
    values = th.cat([th.linspace(-12.0, 12.0, 1_000_001), tiny, -tiny])
    with th.no_grad():  # a row of zeros normalises to 0: tanh(0 * weight + bias) = tanh(bias)
        got = fast_layers.layer_norm_tanh(th.zeros(1, len(values)), th.zeros(len(values)), values)[0].double()
    want = th.tanh(values.double())
    magnitude = want.float().abs()
    ulp = (th.nextafter(magnitude, th.tensor(float("inf"))) - magnitude).double()
    assert ((got - want).abs() / ulp).max().item() < 6


def test_cpu_kernels_fall_back_to_pytorch_ops_with_a_warning(monkeypatch):
    """Switched off: no build, no warning. A failed build (a missing source): one warning, PyTorch ops."""
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setenv("SB3_TDMPC_CPU_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernels.load()
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.delenv("SB3_TDMPC_CPU_KERNELS")
    monkeypatch.setattr(cpu_kernels, "_SOURCES", ["/nonexistent/linear_elu.cpp"])
    with pytest.warns(UserWarning, match="could not build its fused CPU kernels"):
        assert not cpu_kernels.load()
    x, weight_t, bias = th.randn(5, 4), th.randn(4, 3), th.randn(3)
    assert close(fast_layers.affine_elu(x, weight_t, bias), F.elu(x @ weight_t + bias))
    h, weight = th.randn(5, 4), th.randn(4)
    expected = th.tanh(F.layer_norm(h, (4,), weight, bias[:1].expand(4)))
    assert close(fast_layers.layer_norm_tanh(h.clone(), weight, bias[:1].expand(4)), expected)


# The kernel tests above, by name: what a build for another instruction set must pass too.
KERNEL_TESTS = "fused or networks_match or gradients_match or planner or min_q or chain_kernels or frozen_q"


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernels_built_for_a_narrower_instruction_set_match_too(capability):
    """
    The kernels' AVX2 and scalar code paths, which a machine with AVX-512 (or AVX2) does not run:
    the kernel tests above in a process where torch reports the narrower capability, so that the
    kernels are built for it (``ATEN_CPU_CAPABILITY``).
    """
    machine = th.backends.cpu.get_cpu_capability().lower()
    if machine == capability or (capability == "avx2" and machine != "avx512"):
        pytest.skip(f"this machine's own build ({machine}) is the one the tests above check")
    if not cpu_kernels.load():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", KERNEL_TESTS]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=540
    )  # < pytest-timeout's
    summary = result.stdout.strip().rsplit("\n", 1)[-1]
    assert result.returncode == 0 and "skipped" not in summary, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_compiled_paths_give_the_eager_results():
    """``torch_compile=True``: the same plans, losses, priorities and weights (compiling takes minutes)."""
    algos = []
    for torch_compile in (False, True):
        th.manual_seed(0)
        algo = make_algo(torch_compile=torch_compile)
        algo.policy.planning_horizon = 3
        algos.append(algo)
    algos[1].policy.load_state_dict(algos[0].policy.state_dict())
    data, obs = make_batch(), th.randn(2, 3)
    results = []
    for algo in algos:
        th.manual_seed(1)
        with th.inference_mode():
            action, mean = algo.policy.plan(obs, None, explore=True)
        th.manual_seed(2)
        stats, latents = algo._update_world_model(data)
        pi_loss = algo._update_policy_prior(latents, data.masks)
        results.append(
            [action, mean, stats["loss"], th.as_tensor(algo._priorities), pi_loss, *algo.policy.parameters()]
        )
    for eager, compiled in zip(*results, strict=True):
        assert close(eager.detach(), compiled.detach())


@pytest.mark.slow
def test_compiled_layers_match_plain_ones_on_large_batches():
    """The compiled CPU layers over many rows (bias in the fused kernel, narrow inputs as fused terms,
    polynomial exp, ELU backward from its output, one-output layers as reductions, weight gradients
    in the weight's own layout): F.linear/F.elu values and gradients."""
    from sb3_tdmpc.common.fast_layers import add_narrow_matmul, affine, elu_

    gen = th.Generator().manual_seed(0)
    x = th.randn(1100, 24, generator=gen).requires_grad_(True)  # over 1024 rows: the update's layers
    a = th.randn(1100, 3, generator=gen).requires_grad_(True)
    w1, w_a = th.randn(24, 16, generator=gen) / 5, th.randn(3, 16, generator=gen) / 5  # [in, out], as Q's
    w2 = th.randn(20, 16, generator=gen) / 4  # [out, in], as nn.Linear's: used transposed
    w3 = th.randn(20, 1, generator=gen) / 4
    b1, b2, b3 = th.randn(16, generator=gen), th.randn(20, generator=gen), th.randn(1, generator=gen)
    params = [x, a, *(t.requires_grad_(True) for t in (w1, w_a, b1, w2, b2, w3, b3))]

    def layers(x, a, w1, w_a, b1, w2, b2, w3, b3):
        hidden = elu_(affine(elu_(add_narrow_matmul(affine(x, w1, b1), a, w_a)), w2.t(), b2))
        return affine(hidden, w3, b3)

    def plain(x, a, w1, w_a, b1, w2, b2, w3, b3):
        hidden = F.elu(F.linear(F.elu(F.linear(th.cat([x, a], -1), th.cat([w1, w_a]).t(), b1)), w2, b2))
        return F.linear(hidden, w3.t(), b3)

    compiled = th.compile(layers, dynamic=False)(*params)
    expected = plain(*params)
    assert close(compiled, expected)
    got, want = gradients(compiled.square().sum(), params), gradients(expected.square().sum(), params)
    assert all(close(g, w, atol=1e-4) for g, w in zip(got, want, strict=True))
    # Each weight's gradient in the weight's own layout: AccumulateGrad copies any other.
    assert all(g.stride() == p.stride() for g, p in zip(got[2:], params[2:], strict=True) if p.dim() == 2)


@pytest.mark.slow
def test_compiled_tanh_is_within_six_ulp_of_tanh():
    from sb3_tdmpc.common.fast_layers import _rational_tanh
    from sb3_tdmpc.tdmpc.policies import compile_options

    tiny = th.logspace(-30, 1, 10_001)
    x = th.cat([th.linspace(-12.0, 12.0, 1_000_001), tiny, -tiny])
    tanh = th.compile(_rational_tanh, dynamic=False, options=compile_options(th.device("cpu")))
    got, want = tanh(x).double(), th.tanh(x.double())
    magnitude = want.float().abs()
    ulp = (th.nextafter(magnitude, th.tensor(float("inf"))) - magnitude).double()
    assert ((got - want).abs() / ulp).max().item() < 6
    special = tanh(th.tensor([float("inf"), -float("inf"), float("nan")]))
    assert th.allclose(special[:2], th.tensor([1.0, -1.0]), rtol=0, atol=3e-7) and special[2].isnan()


@pytest.mark.slow
def test_compiled_exp_is_within_two_ulp_of_exp():
    from sb3_tdmpc.common.fast_layers import _exp

    x = th.linspace(-87.0, 0.0, 1_000_001)
    got, want = th.compile(_exp, dynamic=False)(x).double(), th.exp(x.double())
    assert ((got - want).abs() / want).max().item() < 2 * 2.0**-24
