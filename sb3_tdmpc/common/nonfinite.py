"""
NaN/inf from the environments: TD-MPC keeps them out of the replay buffer instead of training on them.

A transition with a non-finite reward or next observation is stored as a finite placeholder that no
loss reads (its episode is closed as a time-out at the transition before, and it gets zero priority);
an environment whose next observation is non-finite is reset. docs/reliability.md lists the guarantees.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecEnvWrapper

from sb3_tdmpc.common import checkpoint
from sb3_tdmpc.common.buffers import close_episodes


def finite_rows(values: np.ndarray, n_envs: int) -> np.ndarray:
    """Per environment (first axis): whether every entry is finite (integer data always is)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.inexact):
        return np.ones(n_envs, dtype=bool)
    return np.isfinite(values.reshape(n_envs, -1)).all(axis=1)


def all_finite(values: np.ndarray | None) -> bool:
    """Whether every entry of an array is finite (TDMPC flattens Dict observations before they get here)."""
    values = np.asarray(values)
    return not np.issubdtype(values.dtype, np.inexact) or bool(np.isfinite(values).all())


class NonFiniteTransitions:
    """
    Mixin for an SB3 off-policy algorithm (TDMPC): finds the environments whose step returned NaN/inf
    and keeps those transitions out of the replay buffer. The algorithm's ``_store_transition`` calls
    ``_nonfinite_envs`` and, where that finds any, ``_drop_nonfinite`` before storing.
    """

    num_nonfinite_transitions: int

    def _nonfinite_envs(
        self,
        new_obs: np.ndarray,
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """
        None when every reward and observation of this step is finite (one vectorised check), else
        ``(bad_transition, bad_next_obs)`` per env: the transition to store has a NaN/inf reward or
        next observation; the observation the agent acts on next is NaN/inf.
        """
        if self._vec_normalize_env is not None:
            new_obs, reward = (
                self._vec_normalize_env.get_original_obs(),
                self._vec_normalize_env.get_original_reward(),
            )
        terminal = [
            i for i, done in enumerate(dones) if done and infos[i].get("terminal_observation") is not None
        ]
        if (
            all_finite(reward)
            and all_finite(new_obs)
            and all(all_finite(infos[i]["terminal_observation"]) for i in terminal)
        ):
            return None
        obs_ok = finite_rows(new_obs, len(dones))
        next_ok = obs_ok.copy()
        for i in terminal:
            next_ok[i] = all_finite(infos[i]["terminal_observation"])
        bad_transition = ~(finite_rows(reward, len(dones)) & next_ok)
        return bad_transition, ~obs_ok

    def _drop_nonfinite(
        self,
        replay_buffer: ReplayBuffer,
        bad_transition: np.ndarray,
        bad_next_obs: np.ndarray,
        new_obs: np.ndarray,
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """
        Report NaN/inf from the envs and keep them out of the buffer. A bad transition is replaced
        by a finite placeholder that no loss ever reads (its episode is closed as a time-out at the
        transition before, and it gets zero priority); an env whose next observation is bad is reset.
        """
        if self._vec_normalize_env is not None:
            raise FloatingPointError(
                f"Environment(s) {np.flatnonzero(bad_transition | bad_next_obs).tolist()} returned a "
                f"non-finite reward or observation at step {self.num_timesteps}; with VecNormalize (whose "
                "running statistics absorbed it), training stops here."
            )
        new_obs, reward, dones = (
            np.array(new_obs, copy=True),
            np.array(reward, copy=True),
            np.array(dones, copy=True),
        )
        infos = [dict(info) for info in infos]
        last_obs = np.asarray(self._last_obs)
        for i in np.flatnonzero(bad_transition | bad_next_obs):
            what = "reward" if not np.isfinite(reward[i]).all() else "observation"
            action = (
                "was not stored; its episode is cut there (stored as a time-out)" if bad_transition[i] else ""
            )
            if bad_next_obs[i]:
                action += ("; " if action else "") + "the environment is reset"
            warnings.warn(
                f"Environment {i} returned a non-finite {what} at step {self.num_timesteps}: the transition "
                f"{action} (counted in num_nonfinite_transitions, logged as rollout/nonfinite_transitions).",
                checkpoint.NonFiniteTransitionWarning,
                stacklevel=3,
            )
            if bad_transition[i]:
                self.num_nonfinite_transitions += 1
                close_episodes(replay_buffer, [i])
                reward[i] = 0.0
                dones[i] = True
                infos[i]["terminal_observation"] = np.array(last_obs[i], copy=True)
                infos[i]["TimeLimit.truncated"] = True
            if bad_next_obs[i]:
                assert self.env is not None
                if isinstance(self.env, VecEnvWrapper):
                    raise FloatingPointError(
                        f"Environment {i} returned a non-finite observation at step {self.num_timesteps}; "
                        f"one environment cannot be reset through {type(self.env).__name__}, so training "
                        "stops here."
                    )
                if self._episode_rng is not None:
                    states = checkpoint.env_rng_states(self.env)
                    self._episode_rng[i] = None if states is None else states[i]
                obs, _ = self.env.env_method("reset", indices=[i])[0]
                if not all_finite(obs):
                    raise FloatingPointError(
                        f"Environment {i} returned a non-finite observation at reset "
                        f"(step {self.num_timesteps})"
                    )
                new_obs[i] = obs
                dones[i] = True
        self.logger.record("rollout/nonfinite_transitions", self.num_nonfinite_transitions)
        return new_obs, reward, dones, infos
