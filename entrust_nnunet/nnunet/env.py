"""Where nnU-Net looks for things, and how EnTrust's plug-ins are made visible to it.

nnunetv2 (>= 2.8) finds trainers outside its own package only through the ``nnUNet_extTrainer``
environment variable (see nnunetv2/utilities/find_objects.py). Our trainer plug-ins are shipped
inside the installed package (``entrust_nnunet.trainers``, source folder ``trainers/``), so the one
remaining step for a user of the stock ``nnUNetv2_train``/``nnUNetv2_predict`` is to export that
variable; ``entrust env`` prints the exact line. ``entrust`` commands that call nnU-Net set it
themselves.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

NNUNET_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainer_plugin_dir() -> Path:
    """The installed folder holding the thin trainer plug-ins (source: ``trainers/``)."""
    import entrust_nnunet.trainers as plugins

    return Path(plugins.__file__).resolve().parent


def with_ext_trainer(value: str | None) -> str:
    """``value`` of nnUNet_extTrainer with our plug-in folder appended (once)."""
    ours = str(trainer_plugin_dir())
    parts = [p for p in (value or "").split(os.pathsep) if p]
    if ours not in parts:
        parts.append(ours)
    return os.pathsep.join(parts)


def ensure_ext_trainer(environ: dict | None = None) -> dict:
    """Make nnU-Net's trainer search see our plug-ins in ``environ`` (default: this process)."""
    environ = os.environ if environ is None else environ
    environ["nnUNet_extTrainer"] = with_ext_trainer(environ.get("nnUNet_extTrainer"))
    return environ


def set_nnunet_roots(root: str | os.PathLike, environ: dict | None = None) -> dict:
    """Point nnUNet_raw/_preprocessed/_results at sub-folders of ``root`` (used by the demo and tests)."""
    environ = os.environ if environ is None else environ
    root = Path(root).absolute()
    for var, sub in zip(NNUNET_PATH_VARS, ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        environ[var] = str(root / sub)
    return environ


def export_lines(root: str | os.PathLike | None = None) -> list[str]:
    """Shell lines a user copies into ~/.bashrc so the stock nnU-Net commands find our trainers."""
    lines = []
    if root is not None:
        env = set_nnunet_roots(root, {})
        lines += [f"export {k}={shlex.quote(env[k])}" for k in NNUNET_PATH_VARS]
    value = with_ext_trainer(os.environ.get("nnUNet_extTrainer"))
    lines.append(f"export nnUNet_extTrainer={shlex.quote(value)}")
    return lines
