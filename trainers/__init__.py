"""Thin nnU-Net trainer plug-ins.

This folder is what ``nnUNet_extTrainer`` points at (``entrust env`` prints the line). nnU-Net
imports each module here as a top-level name and drops it again after the search, so the modules
only re-export classes that live in ``entrust_nnunet`` (where spawn workers can unpickle them).
"""
