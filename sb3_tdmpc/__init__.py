"""TD-MPC as a Stable-Baselines3 algorithm.

Importing this package registers every Meta-World MT1 task (``reach-v3``, ...) and every DeepMind
Control Suite task (``dmc/walker-walk-v0``, ...) as a gymnasium id (:mod:`sb3_tdmpc.envs`).
"""

from sb3_tdmpc import envs  # noqa: F401  (registers the environment ids)
from sb3_tdmpc.common.buffers import PrioritizedReplayBuffer
from sb3_tdmpc.tdmpc import TDMPC, CnnPolicy, MlpPolicy, TDMPCPolicy

__version__ = "0.1.0"

__all__ = ["TDMPC", "CnnPolicy", "MlpPolicy", "TDMPCPolicy", "PrioritizedReplayBuffer", "__version__"]
