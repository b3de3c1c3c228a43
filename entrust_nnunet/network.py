"""Old dotted path of EnTrustUNet: plans files written before the package had rooms name
``entrust_nnunet.network.EnTrustUNet``; nnU-Net imports the class by that path."""
from entrust_nnunet.model.network import EnTrustUNet  # noqa: F401
