"""Environment wrappers shared by the suites: action repeat, pixel observations, Dict flattening.

* :class:`ActionRepeat`: repeat each action and sum the rewards (TD-MPC's ``action_repeat``).
* :class:`CloseRendererAtExit`: close a MuJoCo renderer left open before the interpreter exits.
* :class:`PixelObservation`: replace the observation by the last ``frame_stack`` rendered RGB frames,
  channels-first and stacked along the channels (TD-MPC's pixel observations, ``(3k, 84, 84)`` uint8).
* :class:`FlattenDictObservation` (one env) and :class:`VecFlattenDictObservation` (a VecEnv): a Dict of
  Boxes (dm-control's state observations) as one flat float32 vector.
"""

from __future__ import annotations

import atexit
import difflib
import math
import numbers
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

__all__ = [
    "ActionRepeat",
    "CloseRendererAtExit",
    "FlattenDictObservation",
    "PixelObservation",
    "VecFlattenDictObservation",
    "flatten_dict_observation",
    "flat_box",
    "is_flattenable_dict",
]


def check_task(task: str, known: Sequence[str], suite: str) -> str:
    """``task`` if it is one of ``known``; else a ``ValueError`` naming the closest matches."""
    if task not in known:
        matches = difflib.get_close_matches(task, known, n=5)
        hint = f"Did you mean: {', '.join(matches)}?" if matches else f"Known tasks: {', '.join(known)}."
        raise ValueError(f"Unknown {suite} task {task!r}. {hint}")
    return task


class ActionRepeat(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    Repeat each action ``action_repeat`` times and sum the rewards.

    Stops early when the episode ends; the returned observation and info are those of the last inner step.

    :param env: Environment to wrap.
    :param action_repeat: Number of inner steps per agent step (>= 1).
    """

    def __init__(self, env: gym.Env, action_repeat: int) -> None:
        number = isinstance(action_repeat, numbers.Real) and not isinstance(action_repeat, bool)
        if not (number and float(action_repeat).is_integer() and action_repeat >= 1):
            raise ValueError(f"action_repeat must be a positive integer, got {action_repeat!r}")
        gym.utils.RecordConstructorArgs.__init__(self, action_repeat=action_repeat)
        gym.Wrapper.__init__(self, env)
        self.action_repeat = int(action_repeat)
        # Videos recorded at the agent's step rate then play in real time.
        if "render_fps" in env.metadata:
            self.metadata = {**env.metadata, "render_fps": env.metadata["render_fps"] / self.action_repeat}

    @property
    def spec(self) -> EnvSpec | None:
        spec = super().spec
        inner_spec = self.env.spec
        # The inner TimeLimit counts simulator steps; report the limit in agent steps.
        if spec is not None and inner_spec is not None and inner_spec.max_episode_steps is not None:
            spec.max_episode_steps = math.ceil(inner_spec.max_episode_steps / self.action_repeat)
        return spec

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        total_reward = 0.0
        for _ in range(self.action_repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            if terminated or truncated:
                break
        return obs, total_reward, terminated, truncated, info


_open_renderers: weakref.WeakSet[Any] = weakref.WeakSet()


def _close_open_renderers() -> None:
    for renderer in list(_open_renderers):
        renderer.close()


class CloseRendererAtExit(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    Close the MuJoCo renderer of a gymnasium MuJoCo environment (``env.unwrapped.mujoco_renderer``) at
    interpreter exit if it is still open, so that a script which never calls ``env.close()`` exits quietly.

    MuJoCo's EGL backend terminates its display in an ``atexit`` hook, registered when its first GL
    context is made; a renderer still alive then frees its context after that, and prints ``EGLError``
    tracebacks. ``atexit`` runs the last registered hook first: this one is (re-)registered after each
    new renderer's first frame, so after MuJoCo's, and closes the renderers before the display goes.

    :param env: Environment whose ``unwrapped`` has a ``mujoco_renderer``
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)

    def render(self) -> Any:
        frame = self.env.render()
        renderer = getattr(self.env.unwrapped, "mujoco_renderer", None)
        if renderer is not None and renderer not in _open_renderers:
            _open_renderers.add(renderer)
            atexit.unregister(_close_open_renderers)
            atexit.register(_close_open_renderers)
        return frame


class PixelObservation(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    Observe the last ``frame_stack`` rendered RGB frames instead of the state.

    Each frame is ``env.render()`` (the environment must be made with ``render_mode="rgb_array"`` and
    render ``image_size`` x ``image_size`` images), transposed channels-first; the frames are stacked
    along the channels, oldest first: ``Box(0, 255, (3 * frame_stack, image_size, image_size), uint8)``,
    as TD-MPC stores them. Stable-Baselines3 sees a channels-first image (no ``VecTransposeImage``).
    At reset the first frame fills the whole stack. Place it outside :class:`ActionRepeat`, so that only
    the last frame of a repeated action is rendered.

    :param env: Environment with ``render_mode="rgb_array"``
    :param frame_stack: Number of frames stacked
    :param image_size: Expected height and width of the rendered frames
    """

    def __init__(self, env: gym.Env, frame_stack: int = 3, image_size: int = 84) -> None:
        if int(frame_stack) != frame_stack or frame_stack < 1:
            raise ValueError(f"frame_stack must be a positive integer, got {frame_stack!r}")
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"PixelObservation renders the observations: make the environment with "
                f"render_mode='rgb_array' (got {env.render_mode!r})"
            )
        gym.utils.RecordConstructorArgs.__init__(self, frame_stack=frame_stack, image_size=image_size)
        gym.Wrapper.__init__(self, env)
        self.frame_stack, self.image_size = int(frame_stack), int(image_size)
        self.observation_space = spaces.Box(
            0, 255, (3 * self.frame_stack, self.image_size, self.image_size), dtype=np.uint8
        )
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)

    def _render_frame(self) -> np.ndarray:
        frame = self.env.render()
        expected = (self.image_size, self.image_size, 3)
        if not isinstance(frame, np.ndarray) or frame.shape != expected:
            shape = getattr(frame, "shape", None)
            raise ValueError(
                f"render() returned a frame of shape {shape}, expected {expected}: make the environment "
                f"render {self.image_size}x{self.image_size} RGB images"
            )
        return np.ascontiguousarray(frame.transpose(2, 0, 1), dtype=np.uint8)

    def _observation(self) -> np.ndarray:
        return np.concatenate(self._frames, axis=0)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        _, info = self.env.reset(seed=seed, options=options)
        frame = self._render_frame()
        for _ in range(self.frame_stack):
            self._frames.append(frame)
        return self._observation(), info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        _, reward, terminated, truncated, info = self.env.step(action)
        self._frames.append(self._render_frame())
        return self._observation(), reward, terminated, truncated, info


# --------------------------------------------------------------------------- Dict observations


def is_flattenable_dict(space: spaces.Space) -> bool:
    """Whether ``space`` is a (non-empty) Dict whose entries are all Boxes."""
    return (
        isinstance(space, spaces.Dict)
        and len(space.spaces) > 0
        and all(isinstance(sub, spaces.Box) for sub in space.spaces.values())
    )


def flat_box(space: spaces.Dict) -> spaces.Box:
    """The flat float32 Box of a Dict of Boxes, entries in the Dict's key order."""
    flat = spaces.flatten_space(space)
    return spaces.Box(flat.low.astype(np.float32), flat.high.astype(np.float32), dtype=np.float32)


def flatten_dict_observation(space: spaces.Dict, observation: dict[str, Any]) -> np.ndarray:
    """
    Flatten one observation of ``space`` (``[obs_dim]``) or a batch of them (``[n, obs_dim]``).

    A batch is recognised by its entries having one more leading dimension than the space's.
    Entries are concatenated in the space's key order, whatever the order of ``observation``.

    :param space: Dict of Boxes
    :param observation: One observation, or a VecEnv's batched observation
    :return: float32 array
    """
    keys = list(space.spaces)
    first = np.asarray(observation[keys[0]])
    if first.ndim == len(space.spaces[keys[0]].shape):
        return np.concatenate([np.asarray(observation[k], dtype=np.float32).reshape(-1) for k in keys])
    n = first.shape[0]
    return np.concatenate([np.asarray(observation[k], dtype=np.float32).reshape(n, -1) for k in keys], axis=1)


class FlattenDictObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """
    A Dict of Boxes (e.g. dm-control's state observations) as one flat float32 vector.

    :param env: Environment with a Dict-of-Boxes observation space
    """

    def __init__(self, env: gym.Env) -> None:
        if not is_flattenable_dict(env.observation_space):
            raise ValueError(f"Expected a Dict of Boxes observation space, got {env.observation_space}")
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        self.dict_space: spaces.Dict = env.observation_space  # type: ignore[assignment]
        self.observation_space = flat_box(self.dict_space)

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        return flatten_dict_observation(self.dict_space, observation)


class VecFlattenDictObservation(VecEnvWrapper):
    """
    VecEnv version of :class:`FlattenDictObservation`, also for the final observations in ``infos``.

    :param venv: VecEnv with a Dict-of-Boxes observation space
    """

    def __init__(self, venv: VecEnv) -> None:
        if not is_flattenable_dict(venv.observation_space):
            raise ValueError(f"Expected a Dict of Boxes observation space, got {venv.observation_space}")
        self.dict_space: spaces.Dict = venv.observation_space  # type: ignore[assignment]
        super().__init__(venv, observation_space=flat_box(self.dict_space))

    def reset(self) -> VecEnvObs:
        return flatten_dict_observation(self.dict_space, self.venv.reset())  # type: ignore[arg-type]

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = flatten_dict_observation(
                    self.dict_space, info["terminal_observation"]
                )
        return flatten_dict_observation(self.dict_space, obs), rewards, dones, infos  # type: ignore[arg-type]
