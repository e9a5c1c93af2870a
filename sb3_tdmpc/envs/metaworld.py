"""Meta-World MT1 tasks as gymnasium environments (``reach-v3``, ``push-v3``, ...).

Meta-World 3 only registers benchmark ids (``Meta-World/MT1`` with ``env_name=...``).
:func:`register_metaworld_envs` adds one id per task, built by :func:`make_metaworld_env`:
float32 observations with the real bounds, action repeat, ``info["is_success"]`` for
Stable-Baselines3, reproducible ``reset(seed=...)`` and upright video frames.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, SupportsFloat

import gymnasium as gym
import metaworld
import mujoco
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TransformObservation
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from sb3_tdmpc.envs.wrappers import ActionRepeat, CloseRendererAtExit, PixelObservation, check_task

METAWORLD_TASKS: tuple[str, ...] = tuple(sorted(ALL_V3_ENVIRONMENTS))
"""Every Meta-World MT1 task name, sorted."""

DEFAULT_CAMERA = "corner2"
"""Camera used for ``render()`` unless ``camera_name`` or ``camera_id`` is given."""

_ENTRY_POINT = "sb3_tdmpc.envs.metaworld:make_metaworld_env"
_PIXELS_ENTRY_POINT = "sb3_tdmpc.envs.metaworld:make_metaworld_pixels_env"
_DEFAULT_GOAL_SET_SEED = 0


class EpisodeSuccess(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    Add ``info["is_success"]``: whether ``info["success"]`` was true at any step of the episode so far.

    This is Meta-World's per-episode success; Stable-Baselines3 (``Monitor``, ``EvalCallback``,
    ``rollout/success_rate``) reads ``is_success`` at the last step only. Place it under
    :class:`ActionRepeat` so a success at any inner step counts.

    :param env: Environment whose ``info`` has a per-step ``"success"`` entry.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        self._succeeded = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        self._succeeded = False
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._succeeded = self._succeeded or bool(info.get("success", False))
        info["is_success"] = self._succeeded
        return obs, reward, terminated, truncated, info


class SeededReset(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    Make ``reset(seed=s)`` reproducible.

    Meta-World ignores the seed passed to ``reset``, so the goal picked from the task's goal set
    would depend on how many resets came before. Reseeding the base environment's RNG fixes the
    goal choice and everything else drawn from it.

    :param env: Meta-World environment to wrap.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if seed is not None:
            self.unwrapped.seed(seed)
        return self.env.reset(seed=seed, options=options)


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's legacy global RNG (which Meta-World uses), restoring its state afterwards."""
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _to_float32(obs: np.ndarray) -> np.ndarray:
    return np.asarray(obs, dtype=np.float32)


def _make_cameras_upright(model: mujoco.MjModel) -> None:
    """
    Roll by 180 degrees every camera fixed to the world whose image "up" axis points downwards.

    Meta-World's ``corner*`` cameras are authored upside down (presumably for mujoco-py, which
    returned frames bottom-up); with the official MuJoCo bindings their frames are upside down.

    :param model: MuJoCo model, modified in place.
    """
    roll_half_turn = np.array([0.0, 0.0, 0.0, 1.0])  # 180 degrees about the optical axis
    rotation = np.zeros(9)
    for cam_id in range(model.ncam):
        if model.cam_bodyid[cam_id] != 0 or model.cam_mode[cam_id] != mujoco.mjtCamLight.mjCAMLIGHT_FIXED:
            continue
        mujoco.mju_quat2Mat(rotation, model.cam_quat[cam_id])
        if rotation.reshape(3, 3)[2, 1] < 0:  # world z of the camera's y (image up) axis
            rolled = np.zeros(4)
            mujoco.mju_mulQuat(rolled, model.cam_quat[cam_id], roll_half_turn)
            model.cam_quat[cam_id] = rolled


def make_metaworld_env(
    task: str,
    action_repeat: int = 2,
    seed: int | None = None,
    render_mode: str | None = None,
    camera_name: str | None = None,
    **kwargs: Any,
) -> gym.Env:
    """
    Create a Meta-World MT1 task (a goal drawn from a fixed set of 50 at every reset).

    Episodes never terminate; they are truncated after 500 simulator steps, i.e.
    ``ceil(500 / action_repeat)`` agent steps.

    :param task: MT1 task name, one of :data:`METAWORLD_TASKS` (e.g. ``"reach-v3"``).
    :param action_repeat: Number of simulator steps per agent step.
    :param seed: Seeds the 50-goal set and the environment's RNG (goal choice at each reset).
        With ``None`` the goal set is the one of seed 0 and the RNG is unseeded until
        ``reset(seed=...)``, so that seeding the resets alone (as Stable-Baselines3 does)
        reproduces episodes in any process.
    :param render_mode: ``None``, ``"rgb_array"``, ``"depth_array"`` or ``"human"``.
        Headless rendering needs ``MUJOCO_GL=egl`` (or ``osmesa``).
    :param camera_name: Camera to render from; :data:`DEFAULT_CAMERA` unless ``camera_id`` is passed
        (``camera_id=-1`` is MuJoCo's free camera). Fixed cameras are turned upright.
    :param kwargs: Passed on to Meta-World's MT1 constructor (``width``, ``height``, ``camera_id``,
        ``reward_function_version``, ...).
    :return: The wrapped environment.
    """
    check_task(task, METAWORLD_TASKS, "Meta-World")
    if camera_name is None and kwargs.get("camera_id") is None:
        camera_name = DEFAULT_CAMERA

    # What gym.make("Meta-World/MT1", env_name=task, ...) calls, minus gymnasium's registration
    # wrappers: their spec is cached as "Meta-World/MT1" and would hide our own id, and their
    # env checker would warn about the stale observation bounds.
    #
    # Meta-World draws the goal set from NumPy's global RNG, seeded only when ``seed`` is given;
    # without one, two processes would see different goals for the same reset seed.
    with _global_numpy_seed(_DEFAULT_GOAL_SET_SEED if seed is None else seed):
        env = metaworld.make_mt_envs(
            task, seed=seed, render_mode=render_mode, camera_name=camera_name, **kwargs
        )
    base = env.unwrapped
    _make_cameras_upright(base.model)
    # Until a task is set, the observation space is the goal-hidden one (goal bounds fixed at 0);
    # setting one (each reset picks its own anyway) gives the real, goal-observable bounds.
    base.set_task(env.get_wrapper_attr("tasks")[0])
    bounds = base.sawyer_observation_space

    env = SeededReset(env)
    if render_mode is not None:
        env = CloseRendererAtExit(env)
    env = EpisodeSuccess(env)
    env = ActionRepeat(env, action_repeat)
    observation_space = spaces.Box(
        low=bounds.low.astype(np.float32), high=bounds.high.astype(np.float32), dtype=np.float32
    )
    return TransformObservation(env, _to_float32, observation_space)


def make_metaworld_pixels_env(
    task: str,
    action_repeat: int = 2,
    seed: int | None = None,
    frame_stack: int = 3,
    image_size: int = 84,
    camera_name: str | None = None,
    **kwargs: Any,
) -> gym.Env:
    """
    :func:`make_metaworld_env` observed from pixels: the last ``frame_stack`` frames of the fixed camera
    ``camera_name`` (:data:`DEFAULT_CAMERA` unless given), ``(3 * frame_stack, image_size, image_size)``
    uint8 (:class:`~sb3_tdmpc.envs.wrappers.PixelObservation`). Needs ``MUJOCO_GL=egl`` when headless.

    :param kwargs: Passed on to :func:`make_metaworld_env`
    """
    env = make_metaworld_env(
        task,
        action_repeat=action_repeat,
        seed=seed,
        render_mode="rgb_array",
        camera_name=camera_name,
        width=image_size,
        height=image_size,
        **kwargs,
    )
    return PixelObservation(env, frame_stack=frame_stack, image_size=image_size)


def register_metaworld_envs() -> None:
    """
    Register every MT1 task as a gymnasium id (``gym.make("reach-v3", action_repeat=4)``), and from
    pixels as ``reach-pixels-v3`` (:func:`make_metaworld_pixels_env`).

    Ids already in the registry are left alone. No ``max_episode_steps`` is set: Meta-World's own
    limit (500 simulator steps) truncates the episodes.
    """
    for task in METAWORLD_TASKS:
        if task not in gym.registry:
            gym.register(id=task, entry_point=_ENTRY_POINT, kwargs={"task": task})
        # From pixels: reach-v3 -> reach-pixels-v3
        name, version = task.rsplit("-v", 1)
        if f"{name}-pixels-v{version}" not in gym.registry:
            gym.register(
                id=f"{name}-pixels-v{version}", entry_point=_PIXELS_ENTRY_POINT, kwargs={"task": task}
            )
