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
from entrust_nnunet.io import InputError, Terminated, raise_on_sigterm


def _cmd_env(args: argparse.Namespace) -> None:
    from entrust_nnunet.nnunet_env import export_lines

    print("# add these lines to ~/.bashrc so the stock nnUNetv2_* commands find EnTrust's trainers")
    for line in export_lines(args.root):
        print(line)


def _cmd_phantoms(args: argparse.Namespace) -> None:
    from entrust_nnunet.phantoms import write_phantom_dataset

    out = write_phantom_dataset(args.out, num_cases=args.n, num_modalities=args.modalities, dim=args.dim,
                                seed=args.seed, num_annotators=args.annotators, num_test=args.num_test,
                                size=args.size, overwrite=args.overwrite)
    print(f"wrote {out}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from entrust_nnunet import convert

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
    from entrust_nnunet.pipeline import plan_and_preprocess

    plan_and_preprocess(args.d, configurations=args.c, planner=args.pl, num_processes=args.np,
                        verify=args.verify_dataset_integrity)


def _cmd_demo(args: argparse.Namespace) -> None:
    from entrust_nnunet.pipeline import run_demo

    run_demo(args)


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
    p.add_argument("--trainer", default="nnUNetTrainerEnTrust_demo",
                   help="trainer (default: nnUNetTrainerEnTrust_demo, 15 epochs x 50 iterations)")
    p.add_argument("--fresh", action="store_true", help="delete the working folder first")
    p.set_defaults(func=_cmd_demo)


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
    from entrust_nnunet.nnunet_env import ensure_ext_trainer
    from entrust_nnunet.predict import predict_folder

    ensure_ext_trainer()
    model = _model_folder(args)
    folds = None if args.f is None else [f if f == "all" else int(f) for f in args.f]
    out = predict_folder(args.i, args.o, model, folds=folds, checkpoint=args.chk, device=args.device,
                         num_samples=args.num_samples, steps=args.steps, seed=args.seed, step_size=args.step_size,
                         disable_tta=args.disable_tta, save_probabilities=args.save_probabilities,
                         num_processes_preprocessing=args.npp, num_processes_export=args.nps,
                         probe=not args.no_probe)
    print(f"masks in {out}, uncertainty maps in {out / 'uncertainty'}")


def _add_prediction(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="masks plus uncertainty maps (nnUNetv2_predict's flags, plus sampling)",
                       description="Predict with an EnTrust model through nnU-Net's predictor. Writes OUT/CASE<ending> "
                                   "(the mask, as nnUNetv2_predict writes it) and OUT/uncertainty/CASE_{total,aleatoric,"
                                   "epistemic,conflict}<ending> with the input's geometry. Several folds are pooled.")
    p.add_argument("-i", required=True, help="input folder (CASE_XXXX<ending> files, nnU-Net naming)")
    p.add_argument("-o", required=True, help="output folder (must differ from the input folder)")
    p.add_argument("-d", default=None, help="dataset name or id")
    p.add_argument("-c", default="2d", help="configuration (default: 2d)")
    p.add_argument("-tr", default="nnUNetTrainerEnTrust", help="trainer (default: nnUNetTrainerEnTrust)")
    p.add_argument("-p", default=None,
                   help="plans identifier (default: nnUNetPlans, as nnUNetv2_predict; without -p, the only plans "
                        "with a trained model for -tr/-c if there is exactly one)")
    p.add_argument("-m", "--model-folder", default=None, help="trained model folder instead of -d/-c/-tr/-p")
    p.add_argument("-f", nargs="+", default=None, help="folds to pool (default: all folds that exist)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda"), help="device (default: cpu)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch (default: 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--save_probabilities", action="store_true", help="also write the calibrated class probabilities (.npz + .pkl)")
    p.add_argument("-npp", type=int, default=2, help="processes for preprocessing (default: 2)")
    p.add_argument("-nps", type=int, default=2, help="processes for export (default: 2)")
    p.add_argument("--num-samples", type=int, default=8, help="K hypotheses per patch and fold (default: 8)")
    p.add_argument("--steps", type=int, default=None, help="S flow-matching steps (default: the model's, 2)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed, same maps (default: 0)")
    p.add_argument("--no-probe", action="store_true", help="skip ProbeStep (faster; the probe statistic is then 0)")
    p.set_defaults(func=_cmd_predict)


def _print_headline(summary: dict) -> None:
    from entrust_nnunet.evaluate import headline

    names = {"dice": "Dice (foreground mean)", "ece": "ECE (pooled)", "error_auroc": "error AUROC of total (pooled)",
             "conflict_auroc_total": "conflict AUROC of total (pooled)",
             "conflict_auroc_conflict": "conflict AUROC of conflict map (pooled)"}
    for key, value in headline(summary).items():
        print(f"{names[key]:<42} {'n/a' if value != value else f'{value:.4f}'}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from entrust_nnunet.evaluate import evaluate_folder

    output = Path(args.o) if args.o else Path(args.pred) / "summary.json"
    summary = evaluate_folder(args.pred, args.gt, conflict_dir=args.conflict, dataset_json=args.djfile,
                              output_file=output, num_processes=args.np)
    _print_headline(summary)
    print(f"summary: {output.absolute()}")
    if args.report:
        from entrust_nnunet.report import write_report

        out = write_report(args.pred, summary, args.report, images_dir=args.images, gt_dir=args.gt,
                           conflict_dir=args.conflict, num_cases=args.num_cases)
        print(f"report: {out / 'index.html'}")


def _cmd_report(args: argparse.Namespace) -> None:
    from entrust_nnunet.report import write_report

    if args.summary:
        summary = args.summary
    elif args.gt:
        from entrust_nnunet.evaluate import evaluate_folder

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
    p.add_argument("-o", required=True, help="report folder to write (replaced if it exists)")
    p.add_argument("--summary", default=None, help="summary.json written by `entrust evaluate`")
    p.add_argument("--images", default=None, help="images (CASE_XXXX<ending>) to draw under the masks")
    p.add_argument("--gt", default=None, help="reference labels (default: the summary's)")
    p.add_argument("--conflict", default=None, help="true conflict masks (default: the summary's)")
    p.add_argument("-djfile", default=None, help="dataset.json (default: PRED/dataset.json)")
    p.add_argument("--num-cases", type=int, default=3, help="cases drawn (default: 3, conflict cases first)")
    p.add_argument("-np", type=int, default=2, help="processes when evaluating first (default: 2)")
    p.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entrust", description=__doc__.split("\n")[0])
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
                   help="also write this many plausible label variants per case (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_phantoms)

    _add_convert(sub)
    _add_pipeline(sub)
    _add_evaluation(sub)
    _add_prediction(sub)
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
