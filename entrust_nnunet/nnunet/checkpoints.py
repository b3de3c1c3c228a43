"""Loading nnU-Net checkpoints safely: weights only, one clear line per problem, weights that fit the network."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from entrust_nnunet.data.io import InputError
from entrust_nnunet.nnunet.env import ensure_ext_trainer


def load_checkpoint(checkpoint: Path) -> dict:
    """An nnU-Net checkpoint, loaded with ``weights_only=True``: nothing in the file can run code.

    Every problem is one :class:`InputError` line naming the file.
    """
    import pickle
    import re
    import warnings
    import zipfile

    from torch.serialization import safe_globals

    # nnU-Net's checkpoints keep numpy scalars in their logging dict: allow exactly those
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it (np.core warns)
    numpy_types = [np.dtype, core.multiarray.scalar, np.ndarray, core.multiarray._reconstruct,
                   type(np.dtype("float32")), type(np.dtype("float64")), type(np.dtype("int64"))]
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: checkpoint not found")
    try:
        with safe_globals(numpy_types), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)|[Uu]nsupported class ([\w.]+)", str(e))
        if unsafe:
            raise InputError(f"{checkpoint}: refused: the file holds objects that would execute code when loaded "
                             f"({unsafe.group(1) or unsafe.group(2)}); only weights are loaded") from None
        raise InputError(f"{checkpoint}: truncated or corrupt checkpoint (not a torch file)") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else type(e).__name__
        raise InputError(f"{checkpoint}: truncated or corrupt checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "trainer_name" not in ckpt:
        raise InputError(f"{checkpoint}: not an nnU-Net checkpoint (no network_weights/trainer_name)")
    return ckpt


def check_weights_fit(network: nn.Module, weights: dict, checkpoint: Path, plans: Path) -> None:
    """Refuse weights that do not fit ``network`` (missing, unexpected or differently shaped tensors)."""
    expected = network.state_dict()

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    # weights that older checkpoints lack and the network fills with its default (e.g. EnTrustUNet's region flag)
    optional = tuple(getattr(network, "optional_weights", ()))
    missing = [k for k in expected if k not in weights and not k.endswith(optional)]
    unexpected = [k for k in weights if k not in expected]
    shaped = [k for k in expected
              if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)]
    problems = [f"{what} {names(keys)}" for what, keys in (("missing weight(s)", missing),
                ("unexpected weight(s)", unexpected), ("weight(s) of another shape", shaped)) if keys]
    if problems:
        raise InputError(f"{checkpoint}: does not fit the model described by {plans} ({'; '.join(problems)})")


def find_trainer(trainer_name: str, checkpoint: Path) -> type:
    """The trainer class named in a checkpoint, found as nnU-Net finds it (one InputError line if not)."""
    import warnings

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    ensure_ext_trainer()  # our trainers are found without the user exporting nnUNet_extTrainer
    try:
        with warnings.catch_warnings():  # nnU-Net imports every trainer module to find one; not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            return recursive_find_trainer_class_by_name(trainer_name)
    except (RuntimeError, AssertionError):
        raise InputError(f"{checkpoint}: trained with {trainer_name}, which nnU-Net cannot find "
                         f"(is its folder on nnUNet_extTrainer?)") from None


def build_network(trainer_name: str, plans_manager, configuration_manager, dataset_json: dict,
                   checkpoint: Path) -> nn.Module:
    """The network the checkpoint's trainer builds from these plans (nnU-Net's own builders)."""
    import inspect

    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    trainer = find_trainer(trainer_name, checkpoint)
    cm = configuration_manager
    n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        return trainer.build_network_architecture(plans_manager, cm, n_in, n_out, enable_deep_supervision=False)
    return trainer.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                              cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                              enable_deep_supervision=False)

