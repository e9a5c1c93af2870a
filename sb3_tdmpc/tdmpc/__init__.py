from sb3_tdmpc.tdmpc.policies import CnnPolicy, MlpPolicy, TDMPCPolicy
from sb3_tdmpc.tdmpc.tdmpc import TDMPC

__all__ = ["TDMPC", "CnnPolicy", "MlpPolicy", "TDMPCPolicy"]
