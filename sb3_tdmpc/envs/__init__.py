"""Environments: Meta-World MT1 tasks as gymnasium ids.

Importing this module registers the ids (``reach-v3``, ...), so it can be given to rl-zoo3 as
``--gym-packages sb3_tdmpc.envs``.
"""

from sb3_tdmpc.envs.metaworld import METAWORLD_TASKS, make_metaworld_env, register_metaworld_envs

register_metaworld_envs()

__all__ = ["METAWORLD_TASKS", "make_metaworld_env", "register_metaworld_envs"]
