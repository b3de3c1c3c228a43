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
