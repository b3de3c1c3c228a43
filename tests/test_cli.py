"""The command line: one name for the sampling settings, and bad values as one line with exit status 2."""
from entrust_nnunet.cli import build_parser, main
from entrust_nnunet.model.sampling import DEFAULT_SAMPLING


def test_predict_sampling_flags_and_defaults():
    args = build_parser().parse_args(["predict", "-i", "in", "-o", "out", "-d", "1"])
    assert (args.num_hypotheses, args.steps, args.seed) == (DEFAULT_SAMPLING.num_hypotheses, DEFAULT_SAMPLING.steps,
                                                             DEFAULT_SAMPLING.seed)
    args = build_parser().parse_args(["predict", "-i", "in", "-o", "out", "--num-hypotheses", "4"])
    assert args.num_hypotheses == 4
    assert build_parser().parse_args(["predict", "-i", "a", "-o", "b", "--num-samples", "3"]).num_hypotheses == 3


def test_invalid_sampling_is_one_line(tmp_path, capsys):
    rc = main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path), "--num-hypotheses", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "num_hypotheses must be >= 1" in err[0]


def _nnunet_predict_arguments() -> dict[str, dict]:
    """nnUNetv2_predict's flags as the installed nnU-Net declares them (read from its source, not copied)."""
    import ast
    import inspect

    from nnunetv2.inference import predict_from_raw_data as nnunet_predict

    flags = {}
    for node in ast.walk(ast.parse(inspect.getsource(nnunet_predict.predict_entry_point))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            keywords = {k.arg: k.value for k in node.keywords}
            default = keywords.get("default")
            if isinstance(default, ast.Call):  # _getDefaultValue('nnUNet_npp', int, 3): evaluate it as nnU-Net does
                default = getattr(nnunet_predict, default.func.id)(*(eval(compile(ast.Expression(a), "", "eval"))
                                                                      for a in default.args))
            elif default is not None:
                default = ast.literal_eval(default)
            flags[node.args[0].value] = {"default": default, **{k: ast.literal_eval(v) for k, v in keywords.items()
                                                                 if k in ("required", "action")}}
    return flags


def test_predict_flags_mean_what_nnunet_predict_means():
    """Every nnUNetv2_predict flag we accept has nnU-Net's default (-f, -c, -tr, -p: see README)."""
    nnunet = _nnunet_predict_arguments()
    ours = {a.option_strings[0]: a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions}
    for flag in ("-step_size", "-chk", "-npp", "-nps", "-device"):
        assert ours[flag].default == nnunet[flag]["default"], flag
    assert ours["-tr"].default == "nnUNetTrainerEnTrust"  # our trainer, on purpose (README)
    for flag in ("--disable_tta", "--save_probabilities"):
        assert nnunet[flag]["action"] == "store_true" and ours[flag].default is False, flag
    assert nnunet["-c"]["required"] and ours["-c"].default is None  # required with -d, checked when run
    assert set(ours["-device"].choices) == {"cuda", "cpu", "mps"}
    assert nnunet["-f"]["default"] == (0, 1, 2, 3, 4) and ours["-f"].default is None  # every trained fold


def test_predict_needs_a_configuration_with_a_dataset(capsys):
    rc = main(["predict", "-i", "in", "-o", "out", "-d", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "entrust: error: -c: give the configuration (e.g. -c 2d), as nnUNetv2_predict requires it"]


def test_cuda_falls_back_to_the_cpu_with_one_line(monkeypatch, capsys):
    import torch

    from entrust_nnunet.predict import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda") == torch.device("cpu")
    assert capsys.readouterr().out.strip().splitlines() == [
        "entrust: CUDA is not available on this machine; predicting on the CPU"]
    assert resolve_device("cpu") == torch.device("cpu")


def test_bad_flag_values_are_one_line_naming_the_flag(capsys):
    """-f and -step_size are checked when parsed (a traceback before), and argparse's own errors are one line too."""
    import pytest

    for argv, words in ((["predict", "-i", "a", "-o", "b", "-f", "x"], ("argument -f", "'x'")),
                        (["predict", "-i", "a", "-o", "b", "-f", "0", "-1"], ("argument -f", "'-1'")),
                        (["predict", "-i", "a", "-o", "b", "-step_size", "0"], ("argument -step_size", "(0, 1]")),
                        (["predict", "-i", "a", "-o", "b", "-step_size", "1.5"], ("argument -step_size", "'1.5'")),
                        (["calibrate", "-d", "1", "-c", "2d", "-f", "all"], ("argument -f", "'all'")),
                        (["predict", "-i", "a", "-o", "b", "-npp", "many"], ("argument -npp",))):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and all(w in err[0] for w in words), (argv, err)
    args = build_parser().parse_args(["predict", "-i", "a", "-o", "b", "-f", "0", "all", "-step_size", "1"])
    assert args.f == [0, "all"] and args.step_size == 1.0
    assert build_parser().parse_args(["calibrate", "-d", "1", "-c", "2d", "-f", "0", "3"]).f == [0, 3]


def test_calibrate_without_p_finds_the_only_trained_plans_as_predict_does(tmp_path, monkeypatch, capsys):
    """The demo trains with nnUNetEnTrustPlans: `entrust calibrate -d ID -c 2d` without -p must calibrate that
    model (as `entrust predict` picks it), not look into nnUNetPlans' empty folder."""
    import pytest

    from entrust_nnunet.nnunet import calibration

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var / "Dataset997_Cli").mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / var))
    trainer = "nnUNetTrainerEnTrust"
    model = tmp_path / "nnUNet_results" / "Dataset997_Cli" / f"{trainer}__nnUNetEnTrustPlans__2d"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (tmp_path / "nnUNet_results" / "Dataset997_Cli" / f"{trainer}__nnUNetPlans__2d" / "fold_0").mkdir(parents=True)
    seen = []

    def fake_calibrate(folder, folds):
        seen.append((str(folder), folds))
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "calibrate_model", fake_calibrate)
    assert main(["calibrate", "-d", "997", "-c", "2d", "-f", "0"]) == 130
    assert seen == [(str(model), [0])]
    assert "using plans nnUNetEnTrustPlans, the only one with a trained" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):  # -p still names the plans
        from entrust_nnunet.cli import _cmd_calibrate, build_parser

        _cmd_calibrate(build_parser().parse_args(["calibrate", "-d", "997", "-c", "2d", "-p", "nnUNetPlans"]))
    assert seen[1][0].endswith(f"{trainer}__nnUNetPlans__2d")
