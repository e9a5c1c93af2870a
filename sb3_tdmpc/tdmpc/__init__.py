from sb3_tdmpc.tdmpc.policies import MlpPolicy, TDMPCPolicy
from sb3_tdmpc.tdmpc.tdmpc import TDMPC

__all__ = ["TDMPC", "MlpPolicy", "TDMPCPolicy"]
