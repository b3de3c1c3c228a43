"""Mean ± std over seeds and the met / missed / within-noise verdict, against hand-computed numbers."""
import math

import numpy as np
import pytest

from entrust_nnunet.evaluation.seeds import MET, MISSED, WITHIN_NOISE, format_mean_std, mean_std, verdict


def test_mean_std_is_the_sample_std():
    m, s = mean_std([0.927, 0.901, 0.924, None, float("nan")])
    assert m == pytest.approx(np.mean([0.927, 0.901, 0.924]))
    assert s == pytest.approx(np.std([0.927, 0.901, 0.924], ddof=1))
    assert math.isnan(mean_std([1.0])[1]) and all(math.isnan(v) for v in mean_std([]))


def test_mean_std_is_written_without_a_spread_it_does_not_have():
    assert format_mean_std(*mean_std([0.8, 0.6])) == "0.700 ± 0.141"
    assert format_mean_std(*mean_std([0.8]), digits=2) == "0.80"  # one run: no "± 0.000", no "± nan"
    assert format_mean_std(*mean_std([0.0012, 0.0014]), digits=2, scale=1000) == "1.30 ± 0.14"
    assert format_mean_std(*mean_std([])) == format_mean_std(None, None) == "n/a"


def test_verdict_against_pooled_std():
    # the README's MC dropout Dice spread (0.927, 0.901, 0.924) swamps a 0.002 margin
    ours, theirs = [0.929, 0.903, 0.926], [0.927, 0.901, 0.924]
    v = verdict(ours, theirs, higher_is_better=True)
    s = math.sqrt((np.var(ours, ddof=1) + np.var(theirs, ddof=1)) / 2)
    assert v["verdict"] == WITHIN_NOISE and v["difference"] == pytest.approx(0.002) and v["pooled_std"] == pytest.approx(s)
    assert verdict([0.95, 0.951, 0.949], [0.92, 0.921, 0.919], True)["verdict"] == MET
    assert verdict([0.95, 0.951, 0.949], [0.92, 0.921, 0.919], False)["verdict"] == MISSED


def test_verdict_with_factor_and_fixed_bound():
    # ECE <= 0.6x the best baseline: lower is better, d = -(mean(ours) - 0.6 mean(theirs))
    v = verdict([0.004, 0.0041, 0.0039], [0.010, 0.0102, 0.0098], higher_is_better=False, factor=0.6)
    assert v["difference"] == pytest.approx(0.002) and v["verdict"] == MET
    assert v["pooled_std"] == pytest.approx(math.sqrt((0.0001 ** 2 + 0.36 * 0.0002 ** 2) / 2))
    # a fixed bound: only our spread counts
    assert verdict([0.95, 0.93, 0.97], 0.90, True)["verdict"] == MET
    assert verdict([0.91, 0.87, 0.95], 0.90, True)["verdict"] == WITHIN_NOISE
    assert verdict([1.0, 1.0], 1.3, False)["verdict"] == MET  # no spread, no doubt


def test_one_seed_has_no_spread():
    v = verdict([0.93], [0.92], True)
    assert v["verdict"] == MET and v["spread"] is False and math.isnan(v["pooled_std"])
    assert verdict([0.91], [0.92], True)["verdict"] == MISSED
    assert verdict([], [0.92], True)["verdict"] is None
