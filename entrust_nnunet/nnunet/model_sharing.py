"""``entrust export_model_to_zip``: nnU-Net's model export, with EnTrust's calibration inside.

nnU-Net's ``export_pretrained_model`` zips a fixed list of files per configuration (checkpoints, plans,
dataset.json, the validation summaries); ``entrust_calibration.json``, the calibrator ``entrust calibrate``
fitted on every fold's out-of-fold voxels, is not among them, so the installed model would predict with the
one-fold fallback. This runs nnU-Net's export into a temporary file, adds the calibration of every exported
configuration that has one under the same path relative to ``nnUNet_results``, and renames the zip into place.
nnU-Net's ``nnUNetv2_install_pretrained_model_from_zip`` extracts every member, so it installs the calibration too.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from entrust_nnunet.data.io import InputError, check_writable_parent, first_error_line, temporary_sibling
from entrust_nnunet.nnunet.calibration import CALIBRATION_FILE


def export_model_to_zip(dataset: str, output_file, configurations: Sequence[str], trainer: str, plans: str,
                        folds: Sequence[str], strict: bool = True, checkpoints: Sequence[str] = ("checkpoint_final.pth",),
                        crossval_predictions: bool = False) -> list[str]:
    """nnU-Net's ``export_pretrained_model`` with these arguments, plus each configuration's
    ``entrust_calibration.json``; returns the configurations whose calibration went in. ``strict`` False skips
    configurations without a trained model (nnU-Net's entry point cannot turn it off). nnU-Net's refusals
    (a configuration or fold missing, a fold whose training did not finish) become one-line errors."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    output = Path(output_file)
    if output.is_dir():
        raise InputError(f"-o {output}: is a folder; give the name of the zip file to write")
    check_writable_parent(output)
    try:
        name = maybe_convert_to_dataset_name(dataset)
        results = nnUNet_results.require()
    except RuntimeError as e:
        raise InputError(first_error_line(e)) from None
    calibrated = []
    with temporary_sibling(output) as tmp:
        try:
            export_pretrained_model(name, str(tmp), tuple(configurations), trainer, plans, tuple(folds), strict,
                                    tuple(checkpoints), crossval_predictions)
        except (RuntimeError, AssertionError, OSError) as e:
            raise InputError(first_error_line(e)) from None
        with zipfile.ZipFile(tmp, "a", zipfile.ZIP_DEFLATED) as z:
            for c in configurations:
                path = Path(get_output_folder(name, trainer, plans, c)) / CALIBRATION_FILE
                if path.is_file():
                    z.write(path, os.path.relpath(path, results))
                    calibrated.append(c)
        os.replace(tmp, output)
    return calibrated
