"""EnTrust-nnU-Net: inter-modal conflict as the source of segmentation uncertainty (nnU-Net v2 extension)."""
__version__ = "0.1.0"
