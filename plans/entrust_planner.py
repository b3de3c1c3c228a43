"""EnTrust's experiment planner for nnU-Net's planning API; the class lives in entrust_nnunet.nnunet.planner."""
from entrust_nnunet.nnunet.planner import ENTRUST_PLANS, EnTrustPlanner  # noqa: F401
