"""TD-MPC as a Stable-Baselines3 algorithm.

Importing this package registers every Meta-World MT1 task as a gymnasium id (``reach-v3``, ...).
"""

from sb3_tdmpc.common.buffers import PrioritizedReplayBuffer
from sb3_tdmpc.envs import register_metaworld_envs
from sb3_tdmpc.tdmpc import TDMPC, MlpPolicy, TDMPCPolicy

__version__ = "0.1.0"

register_metaworld_envs()

__all__ = ["TDMPC", "MlpPolicy", "TDMPCPolicy", "PrioritizedReplayBuffer", "__version__"]
