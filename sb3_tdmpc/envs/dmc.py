"""DeepMind Control Suite tasks, from states and from pixels, as gymnasium ids.

Built on shimmy's ``dm_control/<domain>-<task>-v0`` environments (``pip install "sb3-tdmpc[dmc]"``).
:func:`register_dmc_envs` adds, for every suite task, without importing dm-control:

* ``dmc/<domain>-<task>-v0``: the state observations flattened to one float32 vector, with action repeat;
* ``dmc/<domain>-<task>-pixels-v0``: the last 3 rendered 84x84 RGB frames, ``(9, 84, 84)`` uint8.

Both are :func:`make_dmc_env`; ``gym.make("dmc/walker-walk-v0", action_repeat=4)`` passes arguments on.
The raw shimmy ids (``dm_control/walker-walk-v0``, Dict observations) work with TDMPC as well: it
flattens Dict observations itself. dm-control episodes last 1000 simulator steps and never terminate.
"""

from __future__ import annotations

import types
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import load_env_creator

from sb3_tdmpc.envs.wrappers import ActionRepeat, FlattenDictObservation, PixelObservation, check_task

# dm_control.suite.ALL_TASKS of dm-control 1.0.28, as "<domain>-<task>" (tests check it matches).
DMC_TASKS: tuple[str, ...] = (
    *("acrobot-swingup", "acrobot-swingup_sparse", "ball_in_cup-catch"),
    *("cartpole-balance", "cartpole-balance_sparse", "cartpole-swingup", "cartpole-swingup_sparse"),
    *("cartpole-two_poles", "cartpole-three_poles", "cheetah-run"),
    *("dog-stand", "dog-walk", "dog-trot", "dog-run", "dog-fetch"),
    *("finger-spin", "finger-turn_easy", "finger-turn_hard", "fish-upright", "fish-swim"),
    *("hopper-stand", "hopper-hop", "humanoid-stand", "humanoid-walk", "humanoid-run"),
    *("humanoid-run_pure_state", "humanoid_CMU-stand", "humanoid_CMU-walk", "humanoid_CMU-run"),
    *("lqr-lqr_2_1", "lqr-lqr_6_2"),
    *("manipulator-bring_ball", "manipulator-bring_peg", "manipulator-insert_ball", "manipulator-insert_peg"),
    *("pendulum-swingup", "point_mass-easy", "point_mass-hard"),
    *("quadruped-walk", "quadruped-run", "quadruped-escape", "quadruped-fetch"),
    *("reacher-easy", "reacher-hard", "stacker-stack_2", "stacker-stack_4"),
    *("swimmer-swimmer6", "swimmer-swimmer15", "walker-stand", "walker-walk", "walker-run"),
)
"""Every DeepMind Control Suite task, ``"<domain>-<task>"`` as in shimmy's ids."""

DEFAULT_ACTION_REPEAT = 2
"""Action repeat of every domain unless told otherwise (TD-MPC2's DMC setup)."""

TDMPC_ACTION_REPEAT: dict[str, int] = {"cartpole": 8, "walker": 2, "finger": 2, "humanoid": 2, "dog": 2}
"""
TD-MPC's (v1) per-domain action repeat, the PlaNet / DrQ convention; others use 4. The official
repository's cfgs/tasks set walker, humanoid and dog to 2 and cartpole to 8; it has no finger file
(so 4 there), finger's 2 is the convention's.
"""

TDMPC_DEFAULT_ACTION_REPEAT = 4
"""TD-MPC's (v1) action repeat of the domains not in :data:`TDMPC_ACTION_REPEAT`."""

DMC_CAMERA_ID: dict[str, int] = {"quadruped": 2}
"""Camera of the pixel observations, as TD-MPC renders them; other domains use camera 0."""

_ENTRY_POINT = "sb3_tdmpc.envs.dmc:make_dmc_env"


def _check_task(task: str) -> str:
    return check_task(task, DMC_TASKS, "DeepMind Control")


def tdmpc_action_repeat(task: str) -> int:
    """TD-MPC's (v1) action repeat for ``task`` (``"walker-walk"`` -> 2, ``"cheetah-run"`` -> 4)."""
    domain = _check_task(task).split("-", 1)[0]
    return TDMPC_ACTION_REPEAT.get(domain, TDMPC_DEFAULT_ACTION_REPEAT)


class _NumpyWithIn1d(types.ModuleType):
    """NumPy plus ``in1d`` (removed in NumPy 2.4), for dm-control 1.0.28's quadruped only."""

    in1d = staticmethod(np.isin)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _patch_quadruped() -> None:
    """dm-control 1.0.28's quadruped calls ``np.in1d``; give that module (only) a NumPy that has it."""
    if hasattr(np, "in1d"):
        return
    from dm_control.suite import quadruped

    if not isinstance(quadruped.np, _NumpyWithIn1d):
        quadruped.np = _NumpyWithIn1d("numpy")


def _shimmy_creator(task: str) -> Any:
    """Shimmy's entry point for ``dm_control/<task>-v0``, registering shimmy's ids on first use."""
    env_id = f"dm_control/{task}-v0"
    if env_id not in gym.registry and not _register_shimmy_envs():
        raise ImportError('DeepMind Control tasks need dm-control and shimmy: pip install "sb3-tdmpc[dmc]"')
    if env_id not in gym.registry:
        raise ImportError(f'{env_id} is unknown: is dm-control installed? pip install "sb3-tdmpc[dmc]"')
    if task.startswith("quadruped-"):
        _patch_quadruped()
    spec = gym.spec(env_id)
    creator = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
    return lambda **kwargs: creator(**spec.kwargs, **kwargs)


def ensure_shimmy_envs(env_id: Any) -> None:
    """Register shimmy's ids if ``env_id`` is an unregistered ``dm_control/...`` id (no-op otherwise)."""
    if isinstance(env_id, str) and env_id.startswith("dm_control/") and env_id not in gym.registry:
        _register_shimmy_envs()  # without shimmy, gymnasium's own error names the missing namespace


def _register_shimmy_envs() -> bool:
    """Register shimmy's ``dm_control/...`` ids; False where shimmy is not installed."""
    try:
        import shimmy
    except ImportError:
        return False
    gym.register_envs(shimmy)
    return True


def make_dmc_env(
    task: str,
    action_repeat: int | str = DEFAULT_ACTION_REPEAT,
    from_pixels: bool = False,
    frame_stack: int = 3,
    image_size: int = 84,
    camera_id: int | None = None,
    seed: int | None = None,
    render_mode: str | None = None,
    render_kwargs: dict[str, Any] | None = None,
) -> gym.Env:
    """
    Create a DeepMind Control Suite task.

    :param task: ``"<domain>-<task>"``, one of :data:`DMC_TASKS` (e.g. ``"walker-walk"``)
    :param action_repeat: Simulator steps per agent step, or ``"tdmpc"`` for TD-MPC's per-domain value
        (:func:`tdmpc_action_repeat`)
    :param from_pixels: Observe the last ``frame_stack`` rendered frames, ``(3 * frame_stack, image_size,
        image_size)`` uint8, instead of the flattened float32 state. Needs a headless renderer
        (``MUJOCO_GL=egl``)
    :param frame_stack: Frames stacked along the channels (pixels only)
    :param image_size: Height and width of the frames (pixels only)
    :param camera_id: Camera of the frames (default: :data:`DMC_CAMERA_ID`, else 0)
    :param seed: Seed of the task's random state (also set by ``reset(seed=...)``)
    :param render_mode: ``render()``'s mode for state observations (``"rgb_array"`` for videos); pixel
        observations always use ``"rgb_array"``
    :param render_kwargs: ``render()``'s size and camera for state observations
        (``width``, ``height``, ``camera_id``)
    :return: The wrapped environment
    """
    _check_task(task)
    if action_repeat == "tdmpc":
        action_repeat = tdmpc_action_repeat(task)
    elif isinstance(action_repeat, str):
        raise ValueError(f"action_repeat must be a positive integer or 'tdmpc', got {action_repeat!r}")
    if camera_id is None:
        camera_id = DMC_CAMERA_ID.get(task.split("-", 1)[0], 0)
    if from_pixels:
        render_mode = "rgb_array"
        render_kwargs = dict(width=image_size, height=image_size, camera_id=camera_id)
    elif render_kwargs is None:
        render_kwargs = dict(camera_id=camera_id)
    env = _shimmy_creator(task)(render_mode=render_mode, render_kwargs=render_kwargs)
    if seed is not None:
        env.reset(seed=seed)
    env = ActionRepeat(env, action_repeat)  # type: ignore[arg-type]
    env = (
        PixelObservation(env, frame_stack=frame_stack, image_size=image_size)
        if from_pixels
        else FlattenDictObservation(env)
    )
    # dm-control declares float64 actions: float32 (bounds kept), as the policy plans and SB3 stores them.
    action_space = env.action_space
    assert isinstance(action_space, spaces.Box)
    env.action_space = spaces.Box(
        action_space.low.astype(np.float32), action_space.high.astype(np.float32), dtype=np.float32
    )
    return env


def register_dmc_envs() -> None:
    """
    Register ``dmc/<domain>-<task>-v0`` (states) and ``dmc/<domain>-<task>-pixels-v0`` (pixels) for every
    task of :data:`DMC_TASKS`. Registering imports neither dm-control nor shimmy; making an env does.
    Ids already in the registry are left alone.
    """
    for task in DMC_TASKS:
        for suffix, from_pixels in (("", False), ("-pixels", True)):
            env_id = f"dmc/{task}{suffix}-v0"
            if env_id not in gym.registry:
                gym.register(
                    id=env_id, entry_point=_ENTRY_POINT, kwargs={"task": task, "from_pixels": from_pixels}
                )
