"""Environments: Meta-World MT1 tasks and DeepMind Control Suite tasks as gymnasium ids.

Importing this module registers the ids (``reach-v3``, ``reach-pixels-v3``, ``dmc/walker-walk-v0``,
``dmc/walker-walk-pixels-v0``, ...), so it can be given to rl-zoo3 as ``--gym-packages sb3_tdmpc.envs``.
Registering the DMC ids imports neither dm-control nor shimmy.
"""

from sb3_tdmpc.envs.dmc import DMC_TASKS, make_dmc_env, register_dmc_envs
from sb3_tdmpc.envs.metaworld import (
    METAWORLD_TASKS,
    make_metaworld_env,
    make_metaworld_pixels_env,
    register_metaworld_envs,
)
from sb3_tdmpc.envs.wrappers import ActionRepeat, PixelObservation

register_metaworld_envs()
register_dmc_envs()

__all__ = [
    "DMC_TASKS",
    "METAWORLD_TASKS",
    "ActionRepeat",
    "PixelObservation",
    "make_dmc_env",
    "make_metaworld_env",
    "make_metaworld_pixels_env",
    "register_dmc_envs",
    "register_metaworld_envs",
]
