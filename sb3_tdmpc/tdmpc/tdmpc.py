"""TD-MPC: Temporal Difference Learning for Model Predictive Control (Hansen et al., 2022)."""

from __future__ import annotations

import io
import pathlib
import pickle
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.type_aliases import (
    GymEnv,
    MaybeCallback,
    RolloutReturn,
    Schedule,
    TrainFreq,
    TrainFrequencyUnit,
)
from stable_baselines3.common.utils import LinearSchedule, polyak_update, should_collect_more_steps
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, unwrap_vec_wrapper

from sb3_tdmpc.common import checkpoint
from sb3_tdmpc.common.buffers import PrioritizedReplayBuffer, SequenceSamples, close_episodes
from sb3_tdmpc.common.nonfinite import NonFiniteTransitions, all_finite
from sb3_tdmpc.envs.dmc import ensure_shimmy_envs
from sb3_tdmpc.envs.wrappers import VecFlattenDictObservation, flatten_dict_observation, is_flattenable_dict
from sb3_tdmpc.tdmpc.policies import CnnPolicy, MlpPolicy, TDMPCPolicy, check_settings, min_q_of_policy

SelfTDMPC = TypeVar("SelfTDMPC", bound="TDMPC")


# TD-MPC clamps each sequence's loss terms (and its priority) here: a term above it gives no gradient.
LOSS_CLAMP = 1e4
# Early in a Meta-World run a few sequences' value terms exceed the clamp (official behaviour); when most
# of an update's sequences do, learning is mostly stalled: that is worth a warning.
CLAMPED_FRACTION_WARNING = 0.5


def _same_row(a: np.ndarray, b: np.ndarray, index: int) -> bool:
    """
    Whether environment ``index`` has bitwise the same observation in the batches ``a`` and ``b``
    (arrays: _wrap_env flattens Dict observations).
    """
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a[index], b[index])


TDMPC_STATE_DICTS = ("policy", "policy.optimizer", "policy.pi_optimizer")
"""What a TDMPC checkpoint holds as state dicts (``<name>.pth`` members of its zip)."""

PLANNER_SETTINGS = frozenset(
    {
        "gamma",
        "horizon",
        "planning_iterations",
        "num_samples",
        "num_elites",
        "policy_fraction",
        "temperature",
        "momentum",
        "min_std",
    }
)
"""TDMPC's arguments that the policy plans with (:class:`TDMPCPolicy`'s of the same names)."""


def _trains_on_sequences(buffer: Any) -> bool:
    """Whether a replay buffer (class or instance) serves TD-MPC's updates, as PrioritizedReplayBuffer."""
    return hasattr(buffer, "sample_sequences") and hasattr(buffer, "update_priorities")


def _check_action_space(action_space: spaces.Space) -> None:
    """
    A clear ValueError for action spaces TDMPC cannot plan in, when an env is wrapped (SB3 asserts
    after that, and `python -O` drops asserts); a loaded model's spaces were checked when it was made.
    """
    if not isinstance(action_space, spaces.Box):
        raise ValueError(
            f"TDMPC supports continuous (Box) action spaces only, got {action_space}: "
            "Discrete and MultiDiscrete actions are not supported."
        )
    if not np.all(np.isfinite(action_space.low) & np.isfinite(action_space.high)):
        raise ValueError(
            f"TDMPC plans actions in [-1, 1] rescaled to the action bounds, which must be finite; got "
            f"{action_space}. Wrap the env in gymnasium.wrappers.ClipAction or RescaleAction."
        )
    if not np.issubdtype(action_space.dtype, np.floating):
        raise ValueError(
            f"TDMPC plans continuous actions: the action Box must be floating-point, got {action_space}"
        )
    if (
        action_space.shape is None
        or int(np.prod(action_space.shape)) == 0
        or np.any(action_space.low >= action_space.high)
    ):
        raise ValueError(
            f"TDMPC needs at least one action dimension, each with low < high (actions are rescaled from "
            f"[-1, 1] to the bounds), got {action_space}"
        )


class _PolicyClassError(ValueError):
    """The policy class is not a TDMPCPolicy (given by the caller, or by another algorithm's checkpoint)."""


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Value at ``step`` of a linear ramp from ``start`` to ``end`` over ``duration`` steps."""
    return LinearSchedule(start, end, end_fraction=1.0)(1.0 - step / max(duration, 1))


class TDMPC(NonFiniteTransitions, OffPolicyAlgorithm):
    """
    TD-MPC: Temporal Difference Learning for Model Predictive Control.

    Paper: https://arxiv.org/abs/2203.04955, official code: https://github.com/nicklashansen/tdmpc.
    The defaults are the official TD-MPC settings. Schedules (planning horizon, planner std) count
    environment steps (``num_timesteps``), not SB3's training progress.

    :param policy: The policy model to use ("MlpPolicy", or "CnnPolicy" for images); an environment id
        here (``TDMPC("reach-v3")``) means ``TDMPC("MlpPolicy", "reach-v3")`` (``CnnPolicy`` if the
        env observes images)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: Learning rate of the world model and of the policy prior
    :param buffer_size: Size of the replay buffer
    :param learning_starts: Seed steps: uniformly random actions before planning and learning start
    :param batch_size: Sequences per gradient step
    :param tau: Soft update coefficient of the target network
    :param gamma: Discount factor
    :param train_freq: Update the model every ``train_freq`` steps (int or tuple, as in SB3)
    :param gradient_steps: Gradient steps after each rollout (-1: as many as environment steps collected)
    :param action_noise: Extra action noise (TD-MPC explores through the planner's std; usually None)
    :param replay_buffer_class: Replay buffer class; must provide ``sample_sequences`` and
        ``update_priorities`` (default: ``PrioritizedReplayBuffer``)
    :param replay_buffer_kwargs: Keyword arguments of the replay buffer (``alpha``, ``beta``, ...)
    :param optimize_memory_usage: Not supported (sequence sampling needs every final observation)
    :param horizon: Length H of the training sequences and largest planning horizon
    :param horizon_warmup_steps: Steps over which the planning horizon grows linearly from 1 to ``horizon``
    :param rho: Temporal weight rho^t of the loss at step t of a sequence
    :param consistency_coef: Weight of the latent state consistency loss
    :param reward_coef: Weight of the reward loss
    :param value_coef: Weight of the TD value loss
    :param target_update_interval: Update the target network every ``target_update_interval`` gradient steps
    :param max_grad_norm: Gradient norm clipping of both optimizers
    :param exploration_initial_std: Planner std floor at step 0
    :param exploration_final_std: Planner std floor after ``exploration_decay_steps``
    :param exploration_decay_steps: Steps over which the std floor decays linearly
    :param seed_updates: Gradient steps taken at once when the seed phase ends (default:
        ``learning_starts``, as TD-MPC pretrains on its seed data); 0 disables
    :param planning_iterations: MPPI iterations per environment step
    :param num_samples: Action sequences sampled per iteration
    :param num_elites: Elite sequences used to refit the sampling distribution
    :param policy_fraction: Share of ``num_samples`` added as policy prior trajectories
    :param temperature: Softmax temperature over elite returns
    :param momentum: Weight of the previous mean when refitting
    :param min_std: Noise of the policy prior's actions (in planning and in TD targets)
    :param policy_kwargs: Arguments of the policy (:class:`TDMPCPolicy`): network sizes (``latent_dim``,
        ``mlp_dim``, ``enc_dim``, ``num_q``), optimizer, ``torch_compile``. The planner settings above
        (``gamma``, ``horizon``, ``num_samples``, ...) are passed to it by TDMPC and are refused here
    :param stats_window_size: Window size for the rollout logging (episodes)
    :param tensorboard_log: The log location for tensorboard (if None, no logging)
    :param verbose: Verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": MlpPolicy, "CnnPolicy": CnnPolicy}
    policy: TDMPCPolicy
    replay_buffer: PrioritizedReplayBuffer

    def __init__(
        self,
        policy: str | type[TDMPCPolicy] = "MlpPolicy",
        env: GymEnv | str | None = None,
        learning_rate: float | Schedule = 1e-3,
        buffer_size: int = 1_000_000,
        learning_starts: int = 5000,
        batch_size: int = 512,
        tau: float = 0.01,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        action_noise: ActionNoise | None = None,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        horizon: int = 5,
        horizon_warmup_steps: int = 25_000,
        rho: float = 0.5,
        consistency_coef: float = 2.0,
        reward_coef: float = 0.5,
        value_coef: float = 0.1,
        target_update_interval: int = 2,
        max_grad_norm: float = 10.0,
        exploration_initial_std: float = 0.5,
        exploration_final_std: float = 0.05,
        exploration_decay_steps: int = 25_000,
        seed_updates: int | None = None,
        planning_iterations: int = 6,
        num_samples: int = 512,
        num_elites: int = 64,
        policy_fraction: float = 0.05,
        temperature: float = 0.5,
        momentum: float = 0.1,
        min_std: float = 0.05,
        policy_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        id_only = env is None and isinstance(policy, str) and policy not in self.policy_aliases
        if id_only:
            policy, env = "MlpPolicy", policy
        ensure_shimmy_envs(env)  # dm_control/... ids exist once shimmy is imported
        if optimize_memory_usage:
            raise ValueError(
                "TDMPC does not support optimize_memory_usage=True: memory-optimised storage drops the final "
                "observation of each episode, which TD-MPC's sequence losses need."
            )
        check_settings(  # here, not after the seed phase
            ("horizon", horizon, isinstance(horizon, (int, np.integer)) and horizon >= 1, "an integer >= 1"),
            ("batch_size", batch_size, batch_size >= 1, ">= 1"),
            ("buffer_size", buffer_size, buffer_size >= 1, ">= 1"),
            ("gamma", gamma, 0 <= gamma <= 1, "in [0, 1]"),
            ("tau", tau, 0 < tau <= 1, "in (0, 1]"),
            ("rho", rho, 0 < rho <= 1, "in (0, 1]"),
            ("max_grad_norm", max_grad_norm, max_grad_norm > 0, "> 0 (the gradient norm clipped to)"),
            ("target_update_interval", target_update_interval, target_update_interval >= 1, ">= 1"),
        )
        super().__init__(
            policy,
            env,  # type: ignore[arg-type]
            learning_rate,
            buffer_size,
            learning_starts,
            batch_size,
            tau,
            gamma,
            train_freq,
            gradient_steps,
            action_noise,
            replay_buffer_class=replay_buffer_class or PrioritizedReplayBuffer,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            sde_support=False,
            support_multi_env=True,
            supported_action_spaces=(spaces.Box,),
        )
        if id_only and self.observation_space is not None and is_image_space(self.observation_space):
            self.policy_class = CnnPolicy  # TDMPC("dmc/walker-walk-pixels-v0"): the id observes images
        self.horizon = horizon
        self.horizon_warmup_steps = horizon_warmup_steps
        self.rho = rho
        self.consistency_coef = consistency_coef
        self.reward_coef = reward_coef
        self.value_coef = value_coef
        self.target_update_interval = target_update_interval
        self.max_grad_norm = max_grad_norm
        self.exploration_initial_std = exploration_initial_std
        self.exploration_final_std = exploration_final_std
        self.exploration_decay_steps = exploration_decay_steps
        self.seed_updates = learning_starts if seed_updates is None else seed_updates
        # Attributes, as SB3 keeps its hyperparameters, so that load(..., num_samples=...) changes them;
        # the policy, which plans, is built with them (_setup_model).
        self.planning_iterations = planning_iterations
        self.num_samples = num_samples
        self.num_elites = num_elites
        self.policy_fraction = policy_fraction
        self.temperature = temperature
        self.momentum = momentum
        self.min_std = min_std
        planner_keys = sorted(PLANNER_SETTINGS & self.policy_kwargs.keys())
        if planner_keys:  # one place for each setting: the updates read gamma and horizon too
            raise ValueError(
                f"policy_kwargs sets {', '.join(planner_keys)}: give the planner's settings as TDMPC's "
                f"arguments (TDMPC(..., {planner_keys[0]}=...)), which the policy plans with"
            )
        # The planner's warm start for the training envs (predict's state), reset at episode starts.
        self._plan_state: tuple[np.ndarray, ...] | None = None
        # Per training env, the RNG state its current episode's reset started from (exact resume).
        self._episode_rng: list[dict[str, Any] | None] | None = None
        self.num_nonfinite_transitions = 0
        # Updates wait until the replay buffer holds this many transitions (a resume without the buffer).
        self._refill_until = 0
        self._warned_loss_clamp = False
        # The env's Dict observation space where TDMPC flattens it (see _wrap_env), for predict().
        self.dict_observation_space: spaces.Dict | None = None

        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        # MlpPolicy: flat (1-D) Box observations (Dicts of Boxes are flattened by _wrap_env);
        # CnnPolicy: channels-first uint8 images.
        if not (isinstance(self.policy_class, type) and issubclass(self.policy_class, TDMPCPolicy)):
            policy = self.policy_class
            raise _PolicyClassError(f"TDMPC needs a TDMPCPolicy (MlpPolicy, CnnPolicy), got {policy}")
        if self.observation_space is not None:
            self.policy_class.check_observation_space(self.observation_space)  # type: ignore[attr-defined]
        flattener = self.env is not None and unwrap_vec_wrapper(self.env, VecFlattenDictObservation)
        if flattener:
            self.dict_observation_space = flattener.dict_space
        if not _trains_on_sequences(self.replay_buffer_class):
            raise TypeError(
                f"TDMPC needs a replay buffer with sample_sequences() and update_priorities(), such as "
                f"PrioritizedReplayBuffer; got {self.replay_buffer_class}"
            )
        # Checkpoints of sb3_tdmpc before 2026-12-01 kept the planner settings in policy_kwargs.
        for key in PLANNER_SETTINGS & self.policy_kwargs.keys():
            setattr(self, key, self.policy_kwargs.pop(key))
        # SB3 builds the policy from self.policy_kwargs: for that call only, the planner settings are
        # added (kept out of the saved policy_kwargs, so that load(policy_kwargs=...) compares the user's).
        policy_kwargs = self.policy_kwargs
        self.policy_kwargs = {**policy_kwargs, **{key: getattr(self, key) for key in PLANNER_SETTINGS}}
        try:
            super()._setup_model()
        finally:
            self.policy_kwargs = policy_kwargs
        frequency = self.train_freq.frequency  # as SB3 parsed it
        check_settings(("train_freq", frequency, frequency >= 1, ">= 1 (steps or episodes)"))
        self._update_schedules()

    def _update_schedules(self) -> None:
        """Set the planner's horizon and std floor from the number of environment steps taken."""
        step = self.num_timesteps
        self.policy.std_floor = linear_schedule(
            self.exploration_initial_std, self.exploration_final_std, self.exploration_decay_steps, step
        )
        self.policy.planning_horizon = int(
            min(self.horizon, linear_schedule(1, self.horizon, self.horizon_warmup_steps, step))
        )

    def _on_step(self) -> None:
        self._update_schedules()

    def _sample_action(
        self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.num_timesteps < learning_starts:
            return super()._sample_action(learning_starts, action_noise, n_envs)
        action, self._plan_state = self.predict(
            self._last_obs,  # type: ignore[arg-type]
            state=self._plan_state,
            episode_start=self._last_episode_starts,
            deterministic=False,
        )
        buffer_action = self.policy.scale_action(action)
        if action_noise is not None:
            buffer_action = np.clip(buffer_action + action_noise(), -1, 1)
            action = self.policy.unscale_action(buffer_action)
        return action, buffer_action

    def _store_transition(
        self,
        replay_buffer: ReplayBuffer,
        buffer_action: np.ndarray,
        new_obs: np.ndarray | dict[str, np.ndarray],
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        dropped = self._nonfinite_envs(new_obs, reward, dones, infos)
        if dropped is not None:
            new_obs, reward, dones, infos = self._drop_nonfinite(
                replay_buffer, *dropped, new_obs, reward, dones, infos
            )
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)
        if dropped is not None and isinstance(replay_buffer, PrioritizedReplayBuffer):
            # The placeholders written for dropped transitions are never drawn as sequence starts.
            replay_buffer.never_start_at_last(np.flatnonzero(dropped[0]))
        # Off-policy SB3 never updates this; the planner's warm start must reset where an episode ended.
        self._last_episode_starts = dones

    # ------------------------------------------------------------------ training

    def train(self, gradient_steps: int, batch_size: int = 512) -> None:
        if self._stored_transitions() < self._refill_until:
            return  # a resumed run refilling its replay buffer (docs/reliability.md)
        self.policy.set_training_mode(True)
        self._update_learning_rate([self.policy.optimizer, self.policy.pi_optimizer])
        # SB3 checks the schedule at progress 1 only: check the rate it has just set.
        learning_rate = self.policy.optimizer.param_groups[0]["lr"]
        if not np.isfinite(learning_rate) or learning_rate < 0:
            raise ValueError(
                f"The learning rate schedule returned {learning_rate} at progress remaining "
                f"{self._current_progress_remaining:.4f} (step {self.num_timesteps}); no update was made"
            )
        self._update_schedules()
        if self._n_updates == 0:
            gradient_steps = max(gradient_steps, self.seed_updates)

        stats: dict[str, list[th.Tensor]] = {}
        start = time.perf_counter()
        for _ in range(gradient_steps):
            data = self.replay_buffer.sample_sequences(batch_size, self.horizon, env=self._vec_normalize_env)
            model_stats, latents = self._update_world_model(data)
            pi_loss = self._update_policy_prior(latents, data.masks)
            self._n_updates += 1
            if self._n_updates % self.target_update_interval == 0:
                polyak_update(*self.policy.ema_parameter_pairs(), self.tau)
            for key, value in {**model_stats, "pi_loss": pi_loss}.items():
                stats.setdefault(key, []).append(value)
        seconds_per_update = (time.perf_counter() - start) / max(gradient_steps, 1)

        means = {}
        if stats:  # one host read for all
            per_key = th.stack([th.stack(values).mean() for values in stats.values()]).tolist()
            means = dict(zip(stats, per_key, strict=True))
        for key, value in means.items():
            self.logger.record(f"train/{key}", value)
        if means.get("clamped_fraction", 0.0) > CLAMPED_FRACTION_WARNING and not self._warned_loss_clamp:
            self._warned_loss_clamp = True
            warnings.warn(
                f"In the updates up to {self._n_updates} (step {self.num_timesteps}), "
                f"{means['clamped_fraction']:.1%} of the sequences had a loss term over TD-MPC's clamp of "
                f"{LOSS_CLAMP:g}, which gives that term no gradient (logged as train/clamped_fraction). The "
                "rewards or observations are probably on a large scale: scale them, e.g. with "
                f"VecNormalize. This warning is given once per model, over {CLAMPED_FRACTION_WARNING:.0%}.",
                stacklevel=2,
            )
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/planner_std", self.policy.std_floor)
        self.logger.record("train/horizon", self.policy.planning_horizon)
        self.logger.record("train/seconds_per_update", seconds_per_update)

    def _update_world_model(self, data: SequenceSamples) -> tuple[dict[str, th.Tensor], th.Tensor]:
        """
        One gradient step on the TOLD losses (``_world_model_loss``), then the new priorities.

        :return: The loss statistics and the detached latent rollout ``[H+1, B, latent_dim]``
        """
        policy = self.policy
        obs = policy.augment(data.observations)  # CnnPolicy: random shift (float32); identity for states
        loss_fn = policy.compiled("world_model_loss", self._world_model_loss)
        loss, (consistency_loss, reward_loss, value_loss), priorities, td_error, z_rollout = loss_fn(
            obs, data.actions, data.rewards, data.terminals, data.masks, data.weights
        )

        policy.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = th.nn.utils.clip_grad_norm_(
            [p for group in policy.optimizer.param_groups for p in group["params"]], self.max_grad_norm
        )
        losses = {"consistency_loss": consistency_loss, "reward_loss": reward_loss, "value_loss": value_loss}
        self._check_finite(grad_norm, losses, step="world_model")
        policy.optimizer.step()
        self.replay_buffer.update_priorities(data.indices, priorities)

        # The sequences with a loss term over the clamp: that term gave them no gradient.
        clamped = (th.cat([*losses.values()], dim=-1).detach() > LOSS_CLAMP).any(dim=-1)
        stats = {
            "consistency_loss": consistency_loss.detach().mean(),
            "reward_loss": reward_loss.detach().mean(),
            "value_loss": value_loss.detach().mean(),
            "loss": loss.detach(),
            "td_error": td_error,
            "grad_norm": grad_norm.detach(),
            "clamped_fraction": clamped.float().mean(),
        }
        return stats, z_rollout

    def _world_model_loss(
        self,
        obs: th.Tensor,
        actions: th.Tensor,
        rewards: th.Tensor,
        terminals: th.Tensor,
        masks: th.Tensor,
        weights: th.Tensor,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor, th.Tensor], th.Tensor, th.Tensor, th.Tensor]:
        """
        The TOLD losses over H-step sequences, each weighted by rho^t:
        latent consistency ||d(z_t, a_t) - h_target(s_{t+1})||^2, reward (R(z_t, a_t) - r_t)^2 and
        TD value sum_Q (Q(z_t, a_t) - y_t)^2 with y_t = r_t + gamma (1 - done_t) min Q_target(z'_t, pi(z'_t)).
        The TD targets are computed for all H steps in one pass, the latents z_1..z_H one step at a
        time, then rewards and Q-values for all H steps in one pass.

        :return: The loss, the per-sequence (consistency, reward, value) losses ``[B, 1]``, the new
            priorities ``[B]``, the mean absolute TD error over valid steps and the detached latents
        """
        model, target, policy = self.policy.model, self.policy.target, self.policy
        horizon = actions.shape[0]

        with th.no_grad():
            # TD-MPC bootstraps from the online encoder and policy, and the target Q.
            next_z = model.encode(obs[1:])
            next_q = min_q_of_policy(model, target.q, next_z, self.min_std)
            td_target = rewards + self.gamma * (1.0 - terminals) * next_q
            consistency_target = policy.target_encode(obs[1:])

        z = model.encode(obs[0])
        latents = [z]
        for t in range(horizon):
            z = model.next_latent(z, actions[t])
            latents.append(z)
        z_rollout = th.stack(latents)
        z_pred, z_start = z_rollout[1:], z_rollout[:-1]
        reward_pred = model.predict_reward(z_start, actions)
        q_pred = model.q(z_start, actions)

        # rho^t, zero for steps past the end of the start's episode.
        rho_t = self._rho_powers(horizon, like=obs) * masks
        td_error = q_pred - td_target
        consistency_loss = (rho_t * (z_pred - consistency_target).pow(2).mean(dim=-1, keepdim=True)).sum(0)
        reward_loss = (rho_t * (reward_pred - rewards).pow(2)).sum(0)
        value_loss = (rho_t * td_error.pow(2).sum(0)).sum(0)

        total_loss = (
            self.consistency_coef * consistency_loss.clamp(max=LOSS_CLAMP)
            + self.reward_coef * reward_loss.clamp(max=LOSS_CLAMP)
            + self.value_coef * value_loss.clamp(max=LOSS_CLAMP)
        ).squeeze(-1)
        # TD-MPC scales the gradient by 1/H.
        loss = (total_loss * weights).mean() / horizon

        with th.no_grad():
            td_abs = td_error.abs()
            priorities = (rho_t * td_abs.sum(0)).sum(0).clamp(max=LOSS_CLAMP).squeeze(-1)
            td_error_mean = (td_abs.mean(0) * masks).sum() / masks.sum().clamp(min=1)
        terms = (consistency_loss, reward_loss, value_loss)
        return loss, terms, priorities, td_error_mean, z_rollout.detach()

    def _update_policy_prior(self, latents: th.Tensor, masks: th.Tensor) -> th.Tensor:
        """
        One gradient step of pi maximising sum_t rho^t min Q(z_t, pi(z_t)) over the detached latent
        rollout; Q is frozen for this step.
        """
        model, policy = self.policy.model, self.policy
        model.q.requires_grad_(False)
        try:
            pi_loss = policy.compiled("policy_prior_loss", self._policy_prior_loss)(latents, masks)
        finally:
            model.q.requires_grad_(True)

        policy.pi_optimizer.zero_grad(set_to_none=True)
        pi_loss.backward()
        grad_norm = th.nn.utils.clip_grad_norm_(model.pi_net.parameters(), self.max_grad_norm)
        self._check_finite(grad_norm, {"pi_loss": pi_loss}, step="policy_prior")
        policy.pi_optimizer.step()
        return pi_loss.detach()

    def _policy_prior_loss(self, latents: th.Tensor, masks: th.Tensor) -> th.Tensor:
        """-sum_t rho^t min Q(z_t, pi(z_t)) over the valid latents, averaged over the batch."""
        model = self.policy.model
        # z_0 is always valid; z_{t+1} is valid where transition t is.
        valid = th.cat([th.ones_like(masks[:1]), masks])
        q = min_q_of_policy(model, model.q, latents, self.min_std)
        return -(self._rho_powers(len(latents), like=latents) * valid * q).sum(0).mean()

    def _rho_powers(self, length: int, like: th.Tensor) -> th.Tensor:
        """rho^t for t < ``length``, ``[length, 1, 1]``: each step's weight in the losses."""
        return self.rho ** th.arange(length, device=like.device, dtype=like.dtype).view(-1, 1, 1)

    def _check_finite(
        self, grad_norm: th.Tensor, losses: dict[str, th.Tensor], step: Literal["world_model", "policy_prior"]
    ) -> None:
        """Stop before a non-finite gradient or loss reaches the weights, naming the step and the term."""
        if bool(th.isfinite(th.stack([grad_norm, *(loss.sum() for loss in losses.values())])).all()):
            return  # one host sync for all
        bad = [name for name, value in losses.items() if not bool(th.isfinite(value.sum()))] or ["gradient"]
        unchanged = (
            "the policy prior was not changed (the world model had already taken this update's finite step)"
            if step == "policy_prior"
            else "no weight, optimizer state or priority was changed"
        )
        raise checkpoint.NonFiniteLossError(
            f"Non-finite {', '.join(bad)} in gradient update {self._n_updates + 1} "
            f"(step {self.num_timesteps}); {unchanged}. Training stops; earlier checkpoints are unaffected. "
            "Check the environment's rewards and observations, or lower the learning rate."
        )

    # ------------------------------------------------------------------ SB3 plumbing

    def learn(
        self: SelfTDMPC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "TDMPC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfTDMPC:
        self._interrupted = False
        try:
            return super().learn(
                total_timesteps=total_timesteps,
                callback=callback,
                log_interval=log_interval,
                tb_log_name=tb_log_name,
                reset_num_timesteps=reset_num_timesteps,
                progress_bar=progress_bar,
            )
        except BaseException:
            # A checkpoint saved now (the zoo saves on Ctrl-C) may hold a half-done step or update.
            self._interrupted = True
            raise

    def _excluded_save_params(self) -> list[str]:
        # learn() sets the refill for the run it starts; a loaded model may warn again
        return [*super()._excluded_save_params(), "_refill_until", "_warned_loss_clamp"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return list(TDMPC_STATE_DICTS), []

    @staticmethod
    def _wrap_env(env: GymEnv, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:
        """SB3's wrapping, then Dict-of-Boxes observations (dm-control's) flattened to a float32 vector."""
        env = OffPolicyAlgorithm._wrap_env(env, verbose, monitor_wrapper)
        _check_action_space(env.action_space)  # before SB3's own asserts
        if is_flattenable_dict(env.observation_space):
            images = [key for key, sub in env.observation_space.spaces.items() if is_image_space(sub)]
            if images:  # flattened, its pixels would be the MLP's inputs
                raise ValueError(
                    f"TDMPC flattens a Dict observation into one vector for the MLP, and {images} are "
                    "images; give image observations alone (not in a Dict) to CnnPolicy, or drop them "
                    f"from the Dict. Got {env.observation_space}"
                )
            if unwrap_vec_wrapper(env, VecNormalize) is not None:  # it would see (and store) Dicts
                raise ValueError(
                    "VecNormalize over Dict observations: TDMPC flattens them into one vector, outside "
                    "the wrappers given, so flatten first and normalize the vector: "
                    "VecNormalize(VecFlattenDictObservation(venv)) (sb3_tdmpc.envs.wrappers)"
                )
            env = VecFlattenDictObservation(env)
        elif isinstance(env.observation_space, spaces.Dict):  # before SB3 asks for a MultiInputPolicy
            raise ValueError(
                "TDMPC observes Box spaces and Dicts whose entries are all Boxes (flattened into one "
                f"vector); got {env.observation_space}"
            )
        return env

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        # A raw env's Dict observation, flattened as the training env's were.
        if isinstance(observation, dict) and self.dict_observation_space is not None:
            observation = flatten_dict_observation(self.dict_observation_space, observation)
        # The planner's settings are TDMPC's attributes, as SB3's hyperparameters: model.num_samples = 64
        # plans with 64 samples from here on (training plans through predict too; its losses read them here).
        self.policy.set_planner(**{key: getattr(self, key) for key in PLANNER_SETTINGS})
        return super().predict(observation, state, episode_start, deterministic)

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        super().set_env(env, force_reset)
        if force_reset:
            self._plan_state = None

    # ------------------------------------------------------------------ collection, checkpoints, resuming

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        train_freq: TrainFreq,
        replay_buffer: ReplayBuffer,
        action_noise: ActionNoise | None = None,
        learning_starts: int = 0,
        log_interval: int | None = None,
    ) -> RolloutReturn:
        """
        SB3's collection loop with three changes, so that checkpoints resume exactly:

        * a step is complete (stored, schedules updated, episodes counted) before ``callback.on_step()``,
          so a checkpoint written by a callback (``CheckpointCallback``) holds the step it is named after;
        * where the rollout stands is kept for such a checkpoint, so that a resumed run finishes the
          same rollout and takes the same gradient steps as the uninterrupted one;
        * each env's RNG state before the step that reset it is kept (``_episode_rng``), so that a
          resumed run can replay the reset of the episode the checkpoint was taken at.
        """
        self.policy.set_training_mode(False)
        num_collected_steps, num_collected_episodes = self.__dict__.pop("_rollout_resume", (0, 0))
        assert isinstance(env, VecEnv), "You must pass a VecEnv"
        assert train_freq.frequency > 0, "Should at least collect one step or episode."
        if env.num_envs > 1:
            assert train_freq.unit == TrainFrequencyUnit.STEP, (
                "You must use only one env when doing episodic training."
            )
        if self._episode_rng is None or len(self._episode_rng) != env.num_envs:
            self._episode_rng = [None] * env.num_envs

        callback.on_rollout_start()
        while should_collect_more_steps(train_freq, num_collected_steps, num_collected_episodes):
            actions, buffer_actions = self._sample_action(learning_starts, action_noise, env.num_envs)
            rng_before_step = checkpoint.env_rng_states(env)
            new_obs, rewards, dones, infos = env.step(actions)
            self.num_timesteps += env.num_envs
            num_collected_steps += 1
            for i in np.flatnonzero(dones):
                self._episode_rng[i] = None if rng_before_step is None else rng_before_step[i]

            self._update_info_buffer(infos, dones)
            self._store_transition(replay_buffer, buffer_actions, new_obs, rewards, dones, infos)  # type: ignore[arg-type]
            self._update_current_progress_remaining(self.num_timesteps, self._total_timesteps)
            self._on_step()
            for idx, done in enumerate(dones):
                if done:
                    num_collected_episodes += 1
                    self._episode_num += 1
                    if action_noise is not None:
                        action_noise.reset(**(dict(indices=[idx]) if env.num_envs > 1 else {}))
                    if log_interval is not None and self._episode_num % log_interval == 0:
                        self.dump_logs()

            callback.update_locals(locals())
            self._rollout_progress = (num_collected_steps, num_collected_episodes)
            try:
                keep_going = callback.on_step()
            finally:
                self._rollout_progress = None
            if not keep_going:
                return RolloutReturn(
                    num_collected_steps * env.num_envs, num_collected_episodes, continue_training=False
                )
        callback.on_rollout_end()
        return RolloutReturn(
            num_collected_steps * env.num_envs, num_collected_episodes, continue_training=True
        )

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        assert self.env is not None, "You must set the environment before calling learn()"
        self._check_replay_buffer(self.replay_buffer, "The replay buffer")
        self._check_batch_size(reset_num_timesteps)
        self._refill_until = 0  # _resume raises it for a run resumed without its replay buffer
        resume = self.__dict__.pop("_resume_state", None)
        rng = self._resume(resume) if resume is not None and not reset_num_timesteps else None
        if reset_num_timesteps or self._last_obs is None:
            # learn() resets the envs: an episode the buffer holds unfinished can never continue.
            self._close_open_episodes()
            self._plan_state = None
            self._episode_rng = None
        result = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if not all_finite(self._last_obs):
            raise FloatingPointError("The environments returned non-finite observations at reset")
        if rng is not None:
            checkpoint.set_global_rng_state(rng["global"])
            self.action_space._np_random = checkpoint.generator_from_state(rng["action_space"])
        return result

    def _capture_resume_state(self) -> dict[str, Any]:
        """What a resumed run needs beyond SB3's saved attributes: RNG states, the envs' current observations
        (SB3's load discards ``_last_obs``), the planner's warm start and the rollout position."""

        def copy(value: np.ndarray | None) -> np.ndarray | None:  # arrays: _wrap_env flattens Dicts
            return None if value is None else np.array(value, copy=True)

        return {
            "version": 1,
            "rng": {
                "global": checkpoint.global_rng_state(),
                "action_space": self.action_space.np_random.bit_generator.state,
            },
            "last_obs": copy(self._last_obs),
            "last_original_obs": copy(self._last_original_obs),
            "plan_state": self._plan_state,
            "rollout_progress": getattr(self, "_rollout_progress", None) or (0, 0),
            "buffer_position": self._buffer_position(),  # to recognise the buffer saved with the model
            "interrupted": getattr(self, "_interrupted", False),
        }

    def _resume(self, state: dict[str, Any]) -> dict[str, Any]:
        """
        Put the loaded run back where it was saved: the envs reset from the RNG states their current
        episodes started from (checked against the saved observations), the saved observations, warm
        start and rollout position. Where that is impossible, warn and let learn() reset the envs (unless
        loaded with ``force_reset=False``: then the envs continue from their current state, as in SB3).

        :return: The RNG states to restore once learn() is set up
        """
        assert self.env is not None
        env, problems = self.env, []
        last_obs, rngs = state["last_obs"], self._episode_rng
        starts = np.asarray(self._last_episode_starts, dtype=bool).reshape(-1)
        if last_obs is None:
            problems.append("it was saved before learn() had stepped any environment")
        elif len(last_obs) != env.num_envs or len(starts) != env.num_envs:
            problems.append(f"it was saved with other environments than the {env.num_envs} given")
        else:
            if not starts.all():
                problems.append(
                    f"environment(s) {np.flatnonzero(~starts).tolist()} were in the middle of an episode "
                    "(an exact resume needs a checkpoint taken at the end of an episode)"
                )
            elif rngs is None or len(rngs) != env.num_envs or any(rng is None for rng in rngs):
                problems.append("the RNG state the environments' current episodes were reset from is unknown")
        if state.get("interrupted"):
            problems.append("it was saved after learn() had stopped on an exception, possibly mid-step")
        if self._vec_normalize_env is not None:  # a reset here would also move its running statistics
            problems.append("the environments are wrapped in VecNormalize, whose state the model lacks")
        own_buffer = self._holds_buffer_saved_at(state["buffer_position"])
        if not own_buffer:
            problem = "the replay buffer is not the one saved with the checkpoint (see load_replay_buffer)"
            if self._stored_transitions() < self._transitions_to_train():
                self._refill_until = self._transitions_to_train()
                problem += f"; updates pause until it holds {self._refill_until} transitions"
            problems.append(problem)
        envs_reset = not problems
        if envs_reset:
            checkpoint.set_env_rng_states(env, rngs)  # type: ignore[arg-type]
            # A reset through the VecEnv (and its wrappers), unseeded: a seed given to load() would
            # override the restored RNG states.
            env.unwrapped._reset_seeds()
            env.unwrapped._reset_options()
            obs = env.reset()
            differ = [i for i in range(env.num_envs) if not _same_row(obs, last_obs, i)]
            if differ:
                problems.append(f"environment(s) {differ} do not reproduce their reset from their RNG state")
        if problems:
            # SB3's load(..., force_reset=False) keeps the saved observations: the envs are not to be reset.
            keep_envs = not envs_reset and self._last_obs is not None and len(self._last_obs) == env.num_envs
            then = (
                "As loaded with force_reset=False, the environments are not reset: they continue from their "
                "current state, which must be the saved one."
                if keep_envs
                else "The environments are reset, and episodes the replay buffer holds unfinished are closed "
                "as time-outs."
            )
            warnings.warn(
                f"learn(reset_num_timesteps=False) continues the run saved at step {self.num_timesteps}, "
                f"but not exactly: {'; '.join(problems)}. {then}",
                checkpoint.ResumeWarning,
                stacklevel=5,
            )
            if not keep_envs:
                self._last_obs = None  # type: ignore[assignment]
                return state["rng"]
            if not own_buffer:
                self._close_open_episodes()  # they are not the envs' current episodes
        else:
            self._rollout_resume = tuple(state["rollout_progress"])
        self._last_obs = last_obs
        self._last_original_obs = state["last_original_obs"]
        self._plan_state = state["plan_state"]
        return state["rng"]

    def _close_open_episodes(self) -> None:
        """Mark the last stored transition of each env as a time-out unless it already ends an episode."""
        if self.replay_buffer is not None:
            close_episodes(self.replay_buffer)

    def _buffer_position(self) -> tuple[int, bool, int | None] | None:
        """
        The replay buffer's write position and how many rows it has ever been given (``None`` where it
        does not count them): two saves of one run's buffer share a position whenever the steps between
        them are a multiple of its size, never the count.
        """
        rb = self.replay_buffer
        return None if rb is None else (int(rb.pos), bool(rb.full), getattr(rb, "rows_added", None))

    def _holds_buffer_saved_at(self, saved: Sequence[Any] | None) -> bool:
        """Whether the replay buffer is the model's own: ``saved`` is the model's ``_buffer_position()``."""
        current = self._buffer_position()
        if saved is None or current is None:
            return saved is None and current is None
        known = 3 if len(saved) > 2 and saved[2] is not None and current[2] is not None else 2
        return tuple(saved)[:known] == current[:known]  # files of earlier versions: the position alone

    def _stored_transitions(self) -> int:
        return self.replay_buffer.size() * self.replay_buffer.n_envs

    def _transitions_to_train(self) -> int:
        """
        Transitions the replay buffer must hold for an update: as many as the seed phase leaves (or a
        batch, or all it can hold). A run starts updating with at least that many; a run resumed without
        its replay buffer (or with a smaller one) collects, planning, until it holds them again.
        """
        rb = self.replay_buffer
        return min(rb.buffer_size * rb.n_envs, max(self.batch_size, self.learning_starts))

    def _check_batch_size(self, reset_num_timesteps: bool) -> None:
        if self.train_freq.unit == TrainFrequencyUnit.EPISODE:
            return  # how much the first episodes store is unknown (batches are drawn with replacement)
        rb = self.replay_buffer
        capacity = rb.buffer_size * rb.n_envs
        stored = self._stored_transitions()
        steps = 0 if reset_num_timesteps else self.num_timesteps
        # The first update follows the first rollout (train_freq env steps, n_envs transitions each) that
        # takes num_timesteps past learning_starts.
        per_rollout = self.train_freq.frequency * rb.n_envs
        rollouts = max(-(-(self.learning_starts + 1 - steps) // per_rollout), 1)
        at_first_update = min(capacity, stored + rollouts * per_rollout)
        if steps > 0:  # a continued run's updates wait for the buffer to refill (train)
            at_first_update = max(at_first_update, self._transitions_to_train())
        if self.batch_size > at_first_update:
            raise ValueError(
                f"batch_size ({self.batch_size}) is larger than the {at_first_update} transitions the "
                f"replay buffer holds at the first gradient update (learning_starts={self.learning_starts}, "
                f"capacity {capacity}): every batch would repeat sequences. Lower batch_size, or raise "
                "learning_starts (and buffer_size) to at least batch_size."
            )

    def _check_replay_buffer(self, buffer: Any, source: str) -> None:
        """Refuse a replay buffer this model cannot train on, with a message naming where it came from."""
        if not isinstance(buffer, ReplayBuffer) or not _trains_on_sequences(buffer):
            raise checkpoint.CheckpointError(
                f"{source} holds a {type(buffer).__name__}, not a replay buffer with sample_sequences() and "
                "update_priorities() such as PrioritizedReplayBuffer"
            )
        if buffer.observation_space != self.observation_space or buffer.action_space != self.action_space:
            raise checkpoint.CheckpointError(
                f"{source} was collected with observation space {buffer.observation_space} and action space "
                f"{buffer.action_space}; this model has {self.observation_space} and {self.action_space}"
            )
        n_envs = self.n_envs if self.env is None else self.env.num_envs
        if buffer.n_envs != n_envs:
            raise checkpoint.CheckpointError(
                f"{source} stores {buffer.n_envs} environment(s) per step, this model steps {n_envs}: "
                "resume with as many environments as the buffer was collected with"
            )
        if not self.horizon < buffer.buffer_size:
            raise checkpoint.CheckpointError(
                f"{source} holds {buffer.buffer_size} steps per env, too few for sequences of "
                f"horizon {self.horizon}"
            )

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """
        Save the model, with everything ``learn(reset_num_timesteps=False)`` needs to continue the run
        exactly after ``load`` (see docs/reliability.md). A path is written atomically: a crash while
        saving leaves any previous file of that name intact.

        :param path: File (``.zip`` appended without a suffix) or writable binary file object
        :param exclude: Attributes not to save, beyond the defaults
        :param include: Attributes to save even if excluded by default
        """
        # A loaded model that has not resumed yet still holds the state of the run it was loaded from.
        pending = self.__dict__.pop("_resume_state", None)
        self._resume_state = pending if pending is not None else self._capture_resume_state()
        try:
            if isinstance(path, (str, pathlib.Path)):
                checkpoint.atomic_write(
                    checkpoint.save_path(path, "zip"),
                    lambda file: super(TDMPC, self).save(file, exclude, include),
                )
            else:
                super().save(path, exclude, include)
        finally:
            del self._resume_state
            if pending is not None:
                self._resume_state = pending

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfTDMPC],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfTDMPC:
        """
        SB3's ``load``, with a :class:`~sb3_tdmpc.common.checkpoint.CheckpointError` naming the file when
        it is truncated, corrupted or was trained on other observation/action spaces than ``env``'s.
        ``learn(reset_num_timesteps=False)`` then continues the saved run (docs/reliability.md).
        """
        if isinstance(path, (str, pathlib.Path)):
            path = checkpoint.load_path(path, "zip")
        checkpoint.check_zip_archive(path)
        try:
            return super().load(
                path,
                env=env,
                device=device,
                custom_objects=custom_objects,
                print_system_info=print_system_info,
                force_reset=force_reset,
                **kwargs,
            )
        except _PolicyClassError as e:  # another algorithm's zip (its policy class)
            raise checkpoint.CheckpointError(f"{path} is not a TD-MPC checkpoint: {e}") from e
        except (KeyError, ValueError) as e:
            # A TD-MPC zip without its optimizers' states (checked only now: another algorithm's zip
            # lacks them too, and is better named by the policy class check above).
            optimizers = tuple(f"{name}.pth" for name in TDMPC_STATE_DICTS)
            checkpoint.check_zip_archive(path, required=optimizers)
            if "spaces do not match" not in str(e):  # SB3's check_for_correct_spaces
                raise
            raise checkpoint.CheckpointError(
                f"{path} cannot run on this environment: {e}. A checkpoint loads only with an environment "
                "of the observation and action spaces it was trained on."
            ) from e

    def save_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """
        Pickle the replay buffer (transitions, SumTree priorities, max priority, write position).
        A path (``.pkl`` appended without a suffix) is written atomically.
        """
        assert self.replay_buffer is not None, "The replay buffer is not defined"
        if isinstance(path, (str, pathlib.Path)):
            checkpoint.atomic_write(
                checkpoint.save_path(path, "pkl"),
                lambda file: pickle.dump(self.replay_buffer, file, protocol=pickle.HIGHEST_PROTOCOL),
            )
        else:
            super().save_replay_buffer(path)

    def load_replay_buffer(
        self, path: str | pathlib.Path | io.BufferedIOBase, truncate_last_traj: bool = True
    ) -> None:
        """
        Load a replay buffer saved by ``save_replay_buffer``. A truncated or corrupted file, or a buffer
        of other spaces or another number of envs, raises a
        :class:`~sb3_tdmpc.common.checkpoint.CheckpointError` naming it, and the current buffer is kept.

        :param path: File (``.pkl`` appended if needed) or readable binary file object
        :param truncate_last_traj: Unused (HER only in SB3); an episode left unfinished by the buffer is
            closed as a time-out when learn() resets the environments
        """
        if isinstance(path, (str, pathlib.Path)):
            buffer = checkpoint.load_pickle(path)
        else:
            try:
                buffer = pickle.load(path)
            except Exception as e:
                raise checkpoint.CheckpointError(f"Cannot read a replay buffer from {path}: {e}") from e
        self._check_replay_buffer(buffer, f"The replay buffer in {path}")
        buffer.device = self.device
        self.replay_buffer = buffer
