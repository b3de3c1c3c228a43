"""The ``entrust`` command line: one console script, one sub-command per step of the pipeline.

Flag names follow nnU-Net's where a flag means the same thing (``-d`` dataset id, ``-c``
configuration, ``-f`` folds, ``-tr`` trainer, ``-p`` plans, ``-device``, ``-np``).
Errors in the user's input print one line ``entrust: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import signal
import sys

from entrust_nnunet import __version__
from entrust_nnunet.data.io import InputError, Terminated, raise_on_sigterm
from entrust_nnunet.model.sampling import DEFAULT_SAMPLING, SamplingSettings


def _cmd_env(args: argparse.Namespace) -> None:
    from entrust_nnunet.nnunet.env import export_lines

    print("# add these lines to ~/.bashrc so the stock nnUNetv2_* commands find EnTrust's trainers")
    for line in export_lines(args.root):
        print(line)


def _cmd_phantoms(args: argparse.Namespace) -> None:
    from entrust_nnunet.data.phantoms import write_phantom_dataset

    out = write_phantom_dataset(args.out, num_cases=args.n, num_modalities=args.modalities, dim=args.dim,
                                seed=args.seed, num_annotators=args.annotators, num_test=args.num_test,
                                size=args.size, overwrite=args.overwrite, conflict_in=args.conflict_in,
                                num_test_annotators=args.test_annotators)
    print(f"wrote {out}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from entrust_nnunet.data import convert

    if args.source_format == "brats":
        out = convert.convert_brats(args.src, args.d, raw_root=args.output_root, name=args.name,
                                    overwrite=args.overwrite)
    elif args.source_format == "folder":
        out = convert.convert_folder(args.src, args.d, modalities=args.modalities.split(","),
                                     raw_root=args.output_root, name=args.name, label_name=args.label,
                                     overwrite=args.overwrite)
    else:
        out = convert.convert_msd(args.src, args.d, overwrite=args.overwrite, num_processes=args.np)
    print(f"wrote {out}")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a dataset layout into an nnU-Net v2 raw dataset",
                       description="Convert BraTS, per-case folders or MSD tasks into nnU-Net v2 raw format. "
                                   "The dataset is built in a temporary folder and renamed at the end; "
                                   "the source is never modified.")
    conv = p.add_subparsers(dest="source_format", required=True, metavar="{brats,folder,msd}")

    def common(q: argparse.ArgumentParser, needs_id: bool = True) -> None:
        q.add_argument("src", help="source folder")
        if needs_id:
            q.add_argument("-d", type=int, required=True, help="nnU-Net dataset id (1-999) to create")
            q.add_argument("-o", "--output-root", default=None,
                           help="raw data root (default: $nnUNet_raw)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")

    q = conv.add_parser("brats", help="BraTS 2020/2021 (*_t1, _t1ce, _t2, _flair, _seg) or 2023 "
                                      "(*-t1n, -t1c, -t2w, -t2f, -seg) case folders",
                        description="BraTS -> nnU-Net raw. Channel order: 0=T1, 1=T1ce, 2=T2, 3=FLAIR. Labels "
                                    "remapped to consecutive integers; whole tumor / tumor core / enhancing tumor "
                                    "declared as regions (regions_class_order). Unlabelled cases go to imagesTs.")
    common(q)
    q.add_argument("--name", default="BraTS", help="dataset name part (default: BraTS)")
    q = conv.add_parser("folder", help="one folder per case: one image per modality + a label file",
                        description="Per-case folders -> nnU-Net raw. Each case folder holds one image per "
                                    "modality named after it (any format SimpleITK reads, or a DICOM series "
                                    "folder) and a label image.")
    common(q)
    q.add_argument("--modalities", required=True, help="comma separated channel names in order, e.g. T1,T2,FLAIR")
    q.add_argument("--label", default="label", help="basename of the label file in each case folder (default: label)")
    q.add_argument("--name", default="Custom", help="dataset name part (default: Custom)")
    q = conv.add_parser("msd", help="a Medical Segmentation Decathlon task folder (delegates to nnU-Net)")
    common(q, needs_id=False)
    q.add_argument("-d", type=int, default=None, help="override the dataset id (default: MSD task number)")
    q.add_argument("-np", type=int, default=2, help="processes for the conversion (default: 2)")
    p.set_defaults(func=_cmd_convert)


def _cmd_plan(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    from entrust_nnunet.pipeline import check_labels, plan_and_preprocess, step_output

    if os.environ.get("nnUNet_raw"):
        for d in args.d:  # bad labels/regions in one line, before the step's log takes the terminal
            check_labels(d)
    root = os.environ.get("nnUNet_preprocessed")
    log = Path(root) / f"entrust_plan_{'_'.join(map(str, args.d))}.log" if root else None
    if log is not None and not args.verbose:
        print(f"nnU-Net fingerprint, planning and preprocessing of dataset {' '.join(map(str, args.d))} (log: {log})")
    with step_output(log, args.verbose):
        identifiers = plan_and_preprocess(args.d, configurations=args.c, planner=args.pl, num_processes=args.np,
                                          verify=args.verify_dataset_integrity)
    print(f"plans: {', '.join(identifiers)}; preprocessed: {', '.join(args.c)}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from entrust_nnunet.pipeline import run_demo

    run_demo(args.dataset_dir, dim=args.dim, folds=args.folds, device=args.device, num_train=args.n,
             num_test=args.num_test, size=args.size, seed=args.seed, trainer=args.trainer, fresh=args.fresh,
             verbose=args.verbose)


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="fingerprint, plan and preprocess a dataset with nnU-Net (EnTrust plans)",
                       description="Runs nnU-Net's fingerprinting, experiment planning and preprocessing through "
                                   "its API, with EnTrust's experiment planner by default.")
    p.add_argument("-d", type=int, nargs="+", required=True, help="dataset id(s)")
    p.add_argument("-c", nargs="+", default=["2d"], help="configurations to preprocess (default: 2d)")
    p.add_argument("-pl", default="EnTrustPlanner",
                   help="experiment planner: EnTrustPlanner (plans nnUNetEnTrustPlans) or any nnU-Net planner "
                        "name such as ExperimentPlanner (plans nnUNetPlans) (default: EnTrustPlanner)")
    p.add_argument("-np", type=int, default=2, help="processes for preprocessing (default: 2)")
    p.add_argument("--verify_dataset_integrity", action="store_true", help="run nnU-Net's dataset check first")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show nnU-Net's output (default: it goes to a log file in $nnUNet_preprocessed)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("demo", help="the main job: phantoms -> plan/preprocess -> train -> predict -> evaluate -> report",
                       description="Runs the whole EnTrust pipeline on generated phantoms on this machine. Finished "
                                   "steps are reused when it is run again (use --fresh to start over).")
    p.add_argument("--dataset-dir", default="entrust_demo",
                   help="working folder for raw/preprocessed/results (default: ./entrust_demo)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=2, help="2D or 3D phantoms (default: 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for training/inference (default: cpu)")
    p.add_argument("--folds", nargs="+", default=["0"], help="folds to train (default: 0)")
    p.add_argument("-n", type=int, default=24, help="number of training phantoms (default: 24)")
    p.add_argument("--num-test", type=int, default=20, help="number of held-out test phantoms (default: 20)")
    p.add_argument("--size", type=int, default=None, help="phantom edge length in voxels (default: 64 in 2D, 32 in 3D)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    p.add_argument("--trainer", default=None,
                   help="trainer (default: nnUNetTrainerEnTrust_demo in 2D, 15 epochs x 50 iterations; "
                        "nnUNetTrainerEnTrust_demo3d in 3D, 20 epochs x 25 iterations)")
    p.add_argument("--fresh", action="store_true", help="delete the working folder first")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show nnU-Net's output (default: one log file per step in DATASET_DIR/logs)")
    p.set_defaults(func=_cmd_demo)


def _fold(value: str) -> int | str:
    """A fold as nnU-Net names them: a number >= 0 or ``all``."""
    if value == "all":
        return value
    return _fold_number(value)


def _fold_number(value: str) -> int:
    """A fold number (>= 0)."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"a fold is a number (0, 1, ...) or 'all', got {value!r}")
    return int(value)


def _step_size(value: str) -> float:
    """nnU-Net's sliding-window step, a fraction of the patch in (0, 1]."""
    try:
        step = float(value)
    except ValueError:
        step = float("nan")
    if not 0 < step <= 1:
        raise argparse.ArgumentTypeError(f"the step is a fraction of the patch in (0, 1], got {value!r}")
    return step


def _env_int(name: str, default: int) -> int:
    """nnUNetv2_predict's defaults for -npp/-nps: an integer environment variable, else ``default``."""
    import os

    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


#: nnUNetv2_predict's default plans identifier
DEFAULT_PLANS = "nnUNetPlans"


def _model_folder(args: argparse.Namespace) -> str:
    """-m, or nnU-Net's results folder for -d/-tr/-p/-c. Without -p: nnUNetPlans, like nnUNetv2_predict,
    unless exactly one plans identifier has a trained model for this trainer and configuration."""
    from pathlib import Path

    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if args.model_folder is not None:
        return args.model_folder
    if args.d is None:
        raise InputError("give -d DATASET (with -c/-tr/-p) or -m MODEL_FOLDER")
    if args.c is None:
        raise InputError("-c: give the configuration (e.g. -c 2d), as nnUNetv2_predict requires it")
    try:
        if args.p is not None:
            return get_output_folder(args.d, args.tr, args.p, args.c)
        default = Path(get_output_folder(args.d, args.tr, DEFAULT_PLANS, args.c))
    except RuntimeError as e:
        raise InputError(str(e).splitlines()[0]) from None
    prefix, suffix = f"{args.tr}__", f"__{args.c}"
    trained = sorted(p for p in default.parent.glob(f"{prefix}*{suffix}") if any(p.glob(f"fold_*/{args.chk}")))
    if len(trained) == 1 and trained[0] != default:
        plans = trained[0].name[len(prefix):-len(suffix)]
        print(f"entrust: using plans {plans}, the only one with a trained {args.tr} {args.c} model "
              f"(-p {DEFAULT_PLANS} is the default otherwise)")
        return str(trained[0])
    return str(default)


def _cmd_predict(args: argparse.Namespace) -> None:
    from entrust_nnunet.nnunet.env import ensure_ext_trainer
    from entrust_nnunet.predict import predict_folder

    ensure_ext_trainer()
    model = _model_folder(args)
    folds = args.f
    try:
        sampling = SamplingSettings(args.num_hypotheses, args.steps, args.seed, not args.no_probe)
    except ValueError as e:
        raise InputError(str(e)) from None
    out = predict_folder(args.i, args.o, model, folds=folds, checkpoint=args.chk, device=args.device,
                         sampling=sampling, step_size=args.step_size, disable_tta=args.disable_tta,
                         save_probabilities=args.save_probabilities, num_processes_preprocessing=args.npp,
                         num_processes_export=args.nps, save_hypotheses=args.save_hypotheses,
                         drop_modalities=args.drop_modalities, prev_stage_predictions=args.prev_stage_predictions)
    print(f"masks in {out}, uncertainty maps in {out / 'uncertainty'}")


def _add_prediction(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="masks plus uncertainty maps (nnUNetv2_predict's flags, plus sampling)",
                       description="Predict with an EnTrust model through nnU-Net's predictor. Writes OUT/CASE<ending> "
                                   "(the mask, as nnUNetv2_predict writes it) and OUT/uncertainty/CASE_{total,aleatoric,"
                                   "epistemic,conflict}<ending> with the input's geometry. Several folds are pooled.")
    p.add_argument("-i", required=True, help="input folder (CASE_XXXX<ending> files, nnU-Net naming)")
    p.add_argument("-o", required=True, help="output folder (must differ from the input folder)")
    p.add_argument("-d", default=None, help="dataset name or id")
    p.add_argument("-c", default=None, help="configuration, e.g. 2d or 3d_fullres (required with -d, as in nnUNetv2_predict)")
    p.add_argument("-tr", default="nnUNetTrainerEnTrust", help="trainer (default: nnUNetTrainerEnTrust)")
    p.add_argument("-p", default=None,
                   help="plans identifier (default: nnUNetPlans, as nnUNetv2_predict; without -p, the only plans "
                        "with a trained model for -tr/-c if there is exactly one)")
    p.add_argument("-m", "--model-folder", default=None, help="trained model folder instead of -d/-c/-tr/-p")
    p.add_argument("-f", nargs="+", type=_fold, default=None,
                   help="folds to pool (default: every fold_X with the checkpoint; with all five trained that is "
                        "nnUNetv2_predict's default 0 1 2 3 4)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"),
                   help="cuda (GPU), cpu or mps (Apple GPU), as nnUNetv2_predict (default: cuda; without a usable GPU "
                        "it falls back to the CPU and says so)")
    p.add_argument("-step_size", type=_step_size, default=0.5,
                   help="sliding-window step as a fraction of the patch, in (0, 1] (default: 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--save_probabilities", action="store_true", help="also write the calibrated class probabilities (.npz + .pkl)")
    p.add_argument("-npp", type=int, default=_env_int("nnUNet_npp", 3),
                   help="processes for preprocessing (default: $nnUNet_npp, else 3, as nnUNetv2_predict); 0: in "
                        "this process (small cases, where a worker's start costs more than it saves)")
    p.add_argument("-nps", type=int, default=_env_int("nnUNet_nps", 3),
                   help="processes for export (default: $nnUNet_nps, else 3, as nnUNetv2_predict); 1: in this process")
    p.add_argument("--num-hypotheses", type=int, default=DEFAULT_SAMPLING.num_hypotheses,
                   help=f"K hypotheses per patch and fold (default: {DEFAULT_SAMPLING.num_hypotheses})")
    p.add_argument("--num-samples", type=int, dest="num_hypotheses", help=argparse.SUPPRESS)  # old name
    p.add_argument("--steps", type=int, default=DEFAULT_SAMPLING.steps,
                   help=f"S flow-matching steps (default: {DEFAULT_SAMPLING.steps})")
    p.add_argument("--seed", type=int, default=DEFAULT_SAMPLING.seed,
                   help=f"sampling seed; same seed, same maps (default: {DEFAULT_SAMPLING.seed})")
    p.add_argument("--save-hypotheses", action="store_true",
                   help="also write every hypothesis as a mask: OUT/hypotheses/CASE_hNN<ending> (with several "
                        "folds fold-major: fold 0's K hypotheses first)")
    p.add_argument("--no-probe", action="store_true", help="skip ProbeStep (faster; the probe statistic is then 0)")
    p.add_argument("-prev_stage_predictions", default=None, metavar="FOLDER",
                   help="a cascade stage (3d_cascade_fullres): the previous stage's masks of these cases, "
                        "FOLDER/CASE<ending> (as nnUNetv2_predict)")
    p.add_argument("--drop-modalities", default=None, metavar="NAMES",
                   help="predict as if these modalities were absent, e.g. T2,FLAIR (dataset.json's channel names; "
                        "needs a model trained with modality dropout, e.g. nnUNetTrainerEnTrustModDrop). Cases whose "
                        "channel files are absent are predicted with those modalities masked anyway")
    p.set_defaults(func=_cmd_predict)


def _cmd_postprocess(args: argparse.Namespace) -> None:
    from entrust_nnunet.nnunet.toolchain import postprocess_folder

    record = postprocess_folder(args.i, args.o, args.pp_pkl_file, num_processes=args.np, plans_json=args.plans_json,
                                dataset_json=args.dataset_json)
    for case, r in record["cases"].items():
        if r["removed_conflict_voxels"]:
            print(f"{case}: post-processing removed {r['removed_conflict_regions']} region(s) that the conflict map "
                  f"marks ({r['removed_conflict_voxels']} voxels with conflict > {record['conflict_mark']})")
    removed = sum(r["removed_voxels"] for r in record["cases"].values())
    print(f"post-processed {len(record['cases'])} cases into {args.o} ({removed} voxels removed; there P(error) is "
          f"now the probability that removing them was wrong)")


def _cmd_ensemble(args: argparse.Namespace) -> None:
    from entrust_nnunet.nnunet.toolchain import ensemble_folders

    out = ensemble_folders(args.i, args.o, save_probabilities=args.save_npz, num_processes=args.np)
    print(f"ensemble of {len(args.i)} folders: masks in {out}, uncertainty maps in {out / 'uncertainty'}")


def _cmd_export_model_to_zip(args: argparse.Namespace) -> None:
    from entrust_nnunet.nnunet.model_sharing import export_model_to_zip

    calibrated = export_model_to_zip(args.d, args.o, args.c, args.tr, args.p, args.f, strict=not args.not_strict,
                                     checkpoints=args.chk, crossval_predictions=args.exp_cv_preds)
    which = f"with the calibration of {', '.join(calibrated)}" if calibrated else \
        "without a calibration (no configuration has entrust_calibration.json: run entrust calibrate first)"
    print(f"wrote {args.o} {which}; nnUNetv2_install_pretrained_model_from_zip installs it")


def _add_toolchain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("postprocess", help="nnUNetv2_apply_postprocessing that keeps the uncertainty maps consistent",
                       description="Apply nnU-Net's post-processing (postprocessing.pkl from "
                                   "nnUNetv2_find_best_configuration) to an `entrust predict --save_probabilities` "
                                   "folder. Where a component is removed, the P(error) map becomes the network's "
                                   "foreground probability there (from the .npz of --save_probabilities; without it "
                                   "1 - P(error)); other maps, .npz and .pkl are copied. Writes "
                                   "postprocessed_regions.json (removed voxels per case, and those the conflict map "
                                   "marks).")
    p.add_argument("-i", required=True, help="input folder (entrust predict output, best with --save_probabilities)")
    p.add_argument("-o", required=True, help="output folder (must differ from the input folder)")
    p.add_argument("-pp_pkl_file", required=True, help="postprocessing.pkl written by nnUNetv2_find_best_configuration")
    p.add_argument("-np", type=int, default=2, help="processes (default: 2)")
    p.add_argument("-plans_json", default=None, help="plans file (default: INPUT/plans.json), as nnU-Net's")
    p.add_argument("-dataset_json", default=None, help="dataset.json (default: INPUT/dataset.json), as nnU-Net's")
    p.set_defaults(func=_cmd_postprocess)

    p = sub.add_parser("ensemble", help="nnUNetv2_ensemble with uncertainty maps (pools configurations like folds)",
                       description="Pool several `entrust predict --save_probabilities` folders (e.g. 2d and "
                                   "3d_fullres): class probabilities averaged as nnUNetv2_ensemble does; aleatoric and "
                                   "conflict averaged; epistemic = the members' epistemic averaged plus the "
                                   "Jensen-Shannon divergence of their class probabilities; P(error) = the members' "
                                   "calibrated P(error) for the ensemble's label, averaged.")
    p.add_argument("-i", nargs="+", required=True, help="prediction folders (two or more)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-np", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--save_npz", "--save_probabilities", dest="save_npz", action="store_true",
                   help="also write the pooled class probabilities (.npz + .pkl), as nnUNetv2_ensemble --save_npz")
    p.set_defaults(func=_cmd_ensemble)

    p = sub.add_parser("export_model_to_zip",
                       help="nnUNetv2_export_model_to_zip that also exports entrust calibrate's fit",
                       description="nnU-Net's model export (the same files, the same flags) plus each configuration's "
                                   "entrust_calibration.json, so that nnUNetv2_install_pretrained_model_from_zip "
                                   "installs the calibration with the model. The zip is written under a temporary "
                                   "name and renamed when complete.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-o", required=True, help="zip file to write")
    p.add_argument("-c", nargs="+", default=["3d_lowres", "3d_fullres", "2d", "3d_cascade_fullres"],
                   help="configurations (default: nnU-Net's four; each must be trained unless --not_strict)")
    p.add_argument("-tr", default="nnUNetTrainerEnTrust", help="trainer (default: nnUNetTrainerEnTrust)")
    p.add_argument("-p", default=DEFAULT_PLANS, help=f"plans identifier (default: {DEFAULT_PLANS})")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default: 0 1 2 3 4)")
    p.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                   help="checkpoint files to export (default: checkpoint_final.pth)")
    p.add_argument("--not_strict", action="store_true", help="skip configurations that have no trained model")
    p.add_argument("--exp_cv_preds", action="store_true", help="also export the cross-validation predictions")
    p.set_defaults(func=_cmd_export_model_to_zip)


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from entrust_nnunet.nnunet.calibration import calibrate_model

    path, content = calibrate_model(_model_folder(args), args.f)
    report = content["report"]
    print(f"calibrator {content['calibrator']} on the out-of-fold voxels of folds {content['folds']} "
          f"({report['voxels']} voxels, error rate {report['error_rate']:.4f})")
    for name, bce in report["held_out_bce_fg_boundary"].items():
        print(f"  held-out BCE (foreground + boundary) {name}: {bce:.4f}")
    if report["in_conflict_map"]:
        c = report["in_conflict_map"]
        print(f"  inside the conflict map (> 0.5): mean P(error) {c['mean_p_error']:.3f}, error rate "
              f"{c['error_rate']:.3f} ({c['voxels']} voxels)")
    print(f"  {content['conflict_reading_choice']}")
    print(f"wrote {path}; entrust predict uses it for this model")


def _print_headline(summary: dict) -> None:
    from entrust_nnunet.evaluation.summary import headline

    names = {"dice": "Dice (foreground mean)", "ece": "ECE (pooled)", "error_auroc": "error AUROC of total (pooled)",
             "conflict_auroc_total": "conflict AUROC of total (pooled)",
             "conflict_auroc_conflict": "conflict AUROC of conflict map (pooled)"}
    for key, value in headline(summary).items():
        print(f"{names[key]:<42} {'n/a' if value != value else f'{value:.4f}'}")
    for key, name in (summary.get("foreground_names") or {}).items():  # per label, or per region (BraTS)
        dice = (summary["mean"].get(key) or {}).get("Dice")
        print(f"{'Dice ' + name:<42} {'n/a' if dice is None else f'{dice:.4f}'}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from entrust_nnunet.evaluation.evaluate import evaluate_folder

    output = Path(args.o) if args.o else Path(args.pred) / "summary.json"
    summary = evaluate_folder(args.pred, args.gt, conflict_dir=args.conflict, dataset_json=args.djfile,
                              output_file=output, num_processes=args.np, annotators_dir=args.annotators)
    _print_headline(summary)
    pp = summary.get("postprocessing")
    if pp and pp["cases_with_removed_conflict"]:
        print(f"post-processing removed {pp['removed_conflict_voxels']} voxels that the conflict map marks "
              f"(conflict > {pp['conflict_mark']}) in {len(pp['cases_with_removed_conflict'])} case(s)")
    print(f"summary: {output.absolute()}")
    if args.report:
        from entrust_nnunet.evaluation.report import write_report

        out = write_report(args.pred, summary, args.report, images_dir=args.images, gt_dir=args.gt,
                           conflict_dir=args.conflict, num_cases=args.num_cases)
        print(f"report: {out / 'index.html'}")


def _cmd_report(args: argparse.Namespace) -> None:
    from entrust_nnunet.evaluation.report import write_report

    if args.summary:
        summary = args.summary
    elif args.gt:
        from entrust_nnunet.evaluation.evaluate import evaluate_folder

        summary = evaluate_folder(args.pred, args.gt, conflict_dir=args.conflict, dataset_json=args.djfile,
                                  num_processes=args.np)
        _print_headline(summary)
    else:
        raise InputError("give --summary SUMMARY.json (from `entrust evaluate`), or --gt LABELS to evaluate first")
    out = write_report(args.pred, summary, args.o, images_dir=args.images, gt_dir=args.gt,
                       conflict_dir=args.conflict, num_cases=args.num_cases)
    print(f"report: {out / 'index.html'}")


def _add_evaluation(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice/HD95 per label plus calibration and error/conflict detection of the maps",
                       description="Evaluate a prediction folder (entrust predict's output) against reference labels: "
                                   "nnU-Net's per-label metrics plus HD95, and the uncertainty maps' ECE, Brier, NLL, "
                                   "error AUROC, AURC, AU/EU entanglement and (with --conflict) conflict AUROCs. "
                                   "Writes an nnU-Net style summary.json (NaN as null).")
    p.add_argument("--pred", required=True, help="prediction folder (masks + uncertainty/)")
    p.add_argument("--gt", required=True, help="reference label folder (CASE<ending>)")
    p.add_argument("--conflict", default=None, help="true conflict masks (CASE<ending>, 0/1), e.g. conflictTs")
    p.add_argument("--annotators", default=None,
                   help="annotator labels CASE_aN<ending>: GED^2 and HM-IoU of the hypotheses (PRED/hypotheses/) "
                        "against them")
    p.add_argument("-djfile", default=None,
                   help="dataset.json (default: PRED/dataset.json, else the one beside the --gt folder)")
    p.add_argument("-o", default=None, help="summary file to write (default: PRED/summary.json)")
    p.add_argument("--report", default=None, help="also write an HTML report into this folder")
    p.add_argument("--images", default=None, help="images (CASE_XXXX<ending>) to draw in the --report")
    p.add_argument("--num-cases", type=int, default=3, help="cases drawn in the --report (default: 3)")
    p.add_argument("-np", type=int, default=2, help="processes (default: 2)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("report", help="HTML report (figures + tables) of an evaluation",
                       description="Write REPORT/index.html with case figures (modalities, mask outline, total and "
                                   "conflict maps, true conflict), reliability diagram, risk-coverage curve and metric "
                                   "tables. Uses --summary, or evaluates first when --gt is given.")
    p.add_argument("pred", help="prediction folder (masks + uncertainty/)")
    p.add_argument("-o", required=True, help="report folder to write (an earlier report there is replaced; any other "
                                              "non-empty folder is refused)")
    p.add_argument("--summary", default=None, help="summary.json written by `entrust evaluate`")
    p.add_argument("--images", default=None, help="images (CASE_XXXX<ending>) to draw under the masks")
    p.add_argument("--gt", default=None, help="reference labels (default: the summary's)")
    p.add_argument("--conflict", default=None, help="true conflict masks (default: the summary's)")
    p.add_argument("-djfile", default=None, help="dataset.json (default: PRED/dataset.json)")
    p.add_argument("--num-cases", type=int, default=3, help="cases drawn (default: 3, conflict cases first)")
    p.add_argument("-np", type=int, default=2, help="processes when evaluating first (default: 2)")
    p.set_defaults(func=_cmd_report)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors (a bad or missing flag) on one line, exit status 2, as every other bad input;
    ``-h`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="entrust", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="print the shell lines that make the stock nnUNetv2_* commands find our trainers")
    p.add_argument("--root", default=None,
                   help="also print nnUNet_raw/_preprocessed/_results lines for sub-folders of this folder")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("phantoms", help="write multimodal phantoms with known inter-modal conflict",
                       description="Write an nnU-Net v2 raw dataset of multimodal phantoms whose conflict regions "
                                   "(one modality shows a structure another hides) carry a coin-flip truth.")
    p.add_argument("out", help="dataset folder to create, e.g. $nnUNet_raw/Dataset501_Phantoms")
    p.add_argument("-n", type=int, default=20, help="number of training cases (default: 20)")
    p.add_argument("--num-test", type=int, default=None, help="number of test cases (default: n // 4, at least 2)")
    p.add_argument("--modalities", type=int, default=3, help="number of modalities / channels (default: 3)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=2, help="2D or 3D phantoms (default: 2)")
    p.add_argument("--size", type=int, default=None, help="edge length in voxels (default: 64 in 2D, 32 in 3D)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    p.add_argument("--annotators", type=int, default=0,
                   help="also write this many plausible label variants per training case (labelsTr_annotators: "
                        "multi-annotator training; default: 0)")
    p.add_argument("--test-annotators", type=int, default=0,
                   help="label variants per test case (labelsTs_annotators: entrust evaluate --annotators scores "
                        "the hypotheses with GED^2 and HM-IoU; default: 0)")
    p.add_argument("--conflict-in", choices=("all", "test"), default="all",
                   help="cases holding conflict blobs: all (default), or test only (a conflict never seen in "
                        "training)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_phantoms)

    _add_convert(sub)
    _add_pipeline(sub)
    _add_evaluation(sub)
    p = sub.add_parser("calibrate", help="fit one calibrator on the out-of-fold validation cases of all folds",
                       description="Fits the probability-of-error calibrator on the out-of-fold voxels every trained "
                                   "fold kept (each training case is out of fold once), choosing between a "
                                   "Platt model on the head's confidence and one with the conflict map and the "
                                   "other statistics by leave-one-fold-out BCE on foreground + boundary voxels. "
                                   "Stores MODEL/entrust_calibration.json; entrust predict then uses it.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-tr", default="nnUNetTrainerEnTrust", help="trainer (default: nnUNetTrainerEnTrust)")
    p.add_argument("-p", default=None, help="plans identifier (default: nnUNetPlans; without -p, the only plans "
                                            "with a trained model for -tr and -c if there is exactly one, as predict)")
    p.add_argument("-f", nargs="+", type=_fold_number, default=None,
                   help="folds (default: every trained fold; each needs its fold_N/calibration_voxels.npz)")
    p.set_defaults(func=_cmd_calibrate, model_folder=None, chk="checkpoint_final.pth")
    _add_prediction(sub)
    _add_toolchain(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = raise_on_sigterm()  # so that SIGTERM, like Ctrl-C, runs the cleanup of temporaries
    try:
        args.func(args)
    except InputError as e:
        print(f"entrust: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("entrust: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("entrust: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may run inside another program (tests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
