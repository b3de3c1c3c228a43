"""Metrics: every value checked against a reference computed another way (sklearn, brute force, by hand)."""
import itertools
import math

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from entrust_nnunet.evaluation import metrics as M


def _softmax(z, axis=0):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------------------------------ Dice / HD95
def test_dice_hand_count():
    gt = np.zeros((6, 6), bool)
    pred = np.zeros((6, 6), bool)
    gt[1:4, 1:4] = True      # 9 voxels
    pred[2:5, 1:4] = True    # 9 voxels, overlap rows 2-3 -> 6
    # TP = 6, FP = 3, FN = 3 -> 12 / 18
    assert M.dice(pred, gt) == pytest.approx(12 / 18)
    assert M.dice(pred.astype(np.uint8), gt.astype(np.float32)) == pytest.approx(2 / 3)
    assert M.dice(gt, gt) == 1.0


def test_dice_empty_masks():
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1, 1] = True
    assert math.isnan(M.dice(empty, empty))  # nnU-Net convention
    assert M.dice(some, empty) == 0.0
    assert M.dice(empty, some) == 0.0
    with pytest.raises(ValueError, match="binary"):
        M.dice(np.full((4, 4), 2), empty)
    with pytest.raises(ValueError, match="same shape"):
        M.dice(empty, np.zeros((4, 5), bool))


def test_hd95_known_shift_anisotropic():
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b_rows = np.roll(a, 3, axis=0)   # shifted 3 voxels along axis 0
    b_cols = np.roll(a, 3, axis=1)   # shifted 3 voxels along axis 1
    spacing = (2.0, 0.5)
    # The 10 boundary voxels of the leading face are 3 voxels from the other square's boundary
    # (28 % of the boundary > 5 %), every other boundary voxel is closer: HD95 = 3 * spacing[axis].
    assert M.hd95(a, b_rows, spacing) == pytest.approx(3 * 2.0)
    assert M.hd95(a, b_cols, spacing) == pytest.approx(3 * 0.5)
    assert M.hd95(b_rows, a, spacing) == pytest.approx(6.0)  # symmetric
    assert M.hd95(a, a, spacing) == 0.0
    a3 = np.zeros((20, 20, 20), bool)
    a3[5:10, 5:10, 5:10] = True
    assert M.hd95(a3, np.roll(a3, 3, axis=2), (1.0, 1.0, 2.5)) == pytest.approx(7.5)
    assert M.hd95(a3, np.roll(a3, 2, axis=0), 1.5) == pytest.approx(3.0)  # isotropic scalar spacing


def test_hd95_empty_masks_and_validation():
    empty = np.zeros((8, 8), bool)
    some = empty.copy()
    some[2:4, 2:4] = True
    assert M.hd95(empty, empty, (1.0, 1.0)) == 0.0
    assert math.isnan(M.hd95(some, empty, (1.0, 1.0)))
    assert math.isnan(M.hd95(empty, some, (1.0, 1.0)))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(some, some, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(some, some, (1.0, -1.0))
    with pytest.raises(ValueError, match="2-D and 3-D"):
        M.hd95(np.ones(5, bool), np.ones(5, bool), 1.0)


# ------------------------------------------------------------------------------------------ calibration
def _tiny_case():
    # 2 classes, 5 voxels; class-1 probabilities and labels chosen away from bin edges (width 1/15)
    p1 = np.array([0.9, 0.1, 0.3, 0.55, 0.9])
    probs = np.stack([1 - p1, p1])
    labels = np.array([1, 1, 0, 0, 1])
    return probs, labels


def test_ece_hand_worked():
    probs, labels = _tiny_case()
    # voxel: confidence, prediction, correct, bin (b/15, (b+1)/15]
    #   0: 0.90, 1, 1, bin 13 (0.8667, 0.9333]
    #   1: 0.90, 0, 0, bin 13
    #   2: 0.70, 0, 1, bin 10 (0.6667, 0.7333]
    #   3: 0.55, 1, 0, bin 8  (0.5333, 0.6000]
    #   4: 0.90, 1, 1, bin 13
    # bin 13: n=3, acc=2/3, conf=0.9 -> 3/5 * |2/3 - 0.9|
    # bin 10: n=1, acc=1,   conf=0.7 -> 1/5 * 0.3
    # bin  8: n=1, acc=0,   conf=0.55 -> 1/5 * 0.55
    expected = 3 / 5 * abs(2 / 3 - 0.9) + 1 / 5 * 0.3 + 1 / 5 * 0.55
    assert M.ece(probs, labels) == pytest.approx(expected)
    assert M.expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(expected)
    # one bin: |mean acc - mean conf| = |3/5 - (0.9*3+0.7+0.55)/5|
    assert M.ece(probs, labels, n_bins=1) == pytest.approx(abs(3 / 5 - (2.7 + 0.7 + 0.55) / 5))
    # mask: keep voxels 0, 2 -> bins 13 (acc 1, conf .9) and 10 (acc 1, conf .7)
    mask = np.array([1, 0, 1, 0, 0], bool)
    assert M.ece(probs, labels, mask=mask) == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)
    assert math.isnan(M.ece(probs, labels, mask=np.zeros(5, bool)))


def test_reliability_curve_shares_binning_with_ece():
    probs, labels = _tiny_case()
    rc = M.reliability_curve(probs, labels)
    assert rc["bin_edges"].shape == (16,) and np.allclose(rc["bin_edges"], np.linspace(0, 1, 16))
    expected_count = np.zeros(15, int)
    expected_count[[8, 10, 13]] = [1, 1, 3]
    np.testing.assert_array_equal(rc["count"], expected_count)
    assert rc["accuracy"][13] == pytest.approx(2 / 3) and rc["confidence"][13] == pytest.approx(0.9)
    assert rc["accuracy"][8] == 0.0 and rc["confidence"][8] == pytest.approx(0.55)
    assert np.isnan(rc["accuracy"][0]) and np.isnan(rc["confidence"][0])
    n = rc["count"].sum()
    recomputed = np.nansum(rc["count"] * np.abs(rc["accuracy"] - rc["confidence"])) / n
    assert recomputed == pytest.approx(M.ece(probs, labels))


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    n, c = 200_000, 3
    logits = rng.normal(scale=2.0, size=(c, n))
    probs = _softmax(logits)
    # labels drawn from the probabilities: perfectly calibrated by construction
    u = rng.random(n)
    labels = (u[None, :] > np.cumsum(probs, axis=0)).sum(axis=0)
    calibrated = M.ece(probs, labels)
    assert calibrated < 0.01
    overconfident = M.ece(_softmax(logits * 3.0), labels)  # temperature 1/3: sharper than the truth
    assert overconfident > 0.05 and overconfident > 5 * calibrated


def test_brier_and_nll_by_explicit_loop():
    rng = np.random.default_rng(1)
    probs = _softmax(rng.normal(size=(4, 5, 6)))
    probs[:, 0, 0] = [1.0, 0.0, 0.0, 0.0]  # a confident wrong voxel hits the eps clip
    labels = rng.integers(0, 4, size=(5, 6))
    labels[0, 0] = 2
    mask = rng.random((5, 6)) > 0.4
    mask[0, 0] = True
    eps = 1e-7
    for m in (None, mask):
        brier, nll, n = 0.0, 0.0, 0
        for i in range(5):
            for j in range(6):
                if m is not None and not m[i, j]:
                    continue
                n += 1
                nll += -math.log(max(probs[labels[i, j], i, j], eps))
                for k in range(4):
                    brier += (probs[k, i, j] - (1.0 if labels[i, j] == k else 0.0)) ** 2
        assert M.brier_score(probs, labels, mask=m) == pytest.approx(brier / n)
        assert M.nll(probs, labels, mask=m, eps=eps) == pytest.approx(nll / n)
    assert M.brier_score(np.eye(3), np.arange(3)) == 0.0
    # one-hot predictions of classes 2, 1, 0 against labels 2, 1, 1: one wrong voxel costs 1 + 1
    assert M.brier_score(np.eye(3)[::-1], np.array([2, 1, 1])) == pytest.approx(2 / 3)
    assert math.isnan(M.brier_score(probs, labels, mask=np.zeros((5, 6), bool)))
    assert math.isnan(M.nll(probs, labels, mask=np.zeros((5, 6), bool)))


def test_probs_labels_validation():
    probs, labels = _tiny_case()
    with pytest.raises(ValueError, match="sum to 1"):
        M.ece(0.5 * probs, labels)
    with pytest.raises(ValueError, match="spatial shape"):
        M.brier_score(probs, labels[:4])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        M.nll(probs, labels + 1)
    with pytest.raises(ValueError, match="integer"):
        M.nll(probs, labels + 0.5)
    with pytest.raises(ValueError, match="mask"):
        M.ece(probs, labels, mask=np.ones(4, bool))
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="eps"):
        M.nll(probs, labels, eps=0.0)


def test_foreground_boundary_mask():
    labels = np.zeros((9, 9), np.uint8)
    labels[3:6, 3:6] = 1
    labels[4, 4] = 2
    pred = np.zeros((9, 9), np.uint8)
    pred[0, 8] = 1  # a false positive far from the GT
    m0 = M.foreground_boundary_mask(labels, pred, width=0)
    np.testing.assert_array_equal(m0, (labels > 0) | (pred > 0))
    m1 = M.foreground_boundary_mask(labels, pred, width=1)
    # by hand: GT square + 1-voxel cross-shaped band around it (corners excluded) + the FP voxel
    expected = np.zeros((9, 9), bool)
    expected[2:7, 3:6] = True
    expected[3:6, 2:7] = True
    expected[0, 8] = True
    np.testing.assert_array_equal(m1, expected)
    m2 = M.foreground_boundary_mask(labels, pred, width=2)
    # city-block ball of radius 2: square 9 + ring at distance 1 (4 x 3) + ring at distance 2 (4 x 3 + 4
    # diagonal corners) + the FP voxel
    assert m2[1, 4] and m2[2, 2] and not m2[1, 2] and not m2[0, 4] and m2.sum() == 9 + 12 + 16 + 1
    assert not M.foreground_boundary_mask(np.zeros((4, 4)), np.zeros((4, 4)), 2).any()
    with pytest.raises(ValueError, match="width"):
        M.foreground_boundary_mask(labels, pred, width=-1)
    with pytest.raises(ValueError, match="same shape"):
        M.foreground_boundary_mask(labels, pred[:3])


# ------------------------------------------------------------------------------------------ AUROC / AURC
def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    target = rng.random((20, 30)) < 0.3
    score = np.round(rng.random((20, 30)) + 0.4 * target, 1)  # rounding creates many ties
    assert M.auroc(score, target) == pytest.approx(roc_auc_score(target.ravel(), score.ravel()))
    err = M.error_auroc(score, target)
    assert err == pytest.approx(roc_auc_score(target.ravel(), score.ravel()))
    mask = rng.random((20, 30)) < 0.5
    assert M.error_auroc(score, target, mask=mask) == pytest.approx(roc_auc_score(target[mask], score[mask]))
    assert M.auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert M.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def test_auroc_single_class_is_nan():
    assert math.isnan(M.auroc(np.arange(5.0), np.zeros(5, bool)))
    assert math.isnan(M.error_auroc(np.arange(5.0), np.ones(5, bool)))
    assert math.isnan(M.auroc(np.arange(4.0), [0, 1, 0, 1], mask=[1, 0, 1, 0]))
    with pytest.raises(ValueError, match="finite"):
        M.auroc([np.nan, 1.0], [0, 1])
    with pytest.raises(ValueError, match="binary"):
        M.auroc([0.0, 1.0], [0, 2])


def _risk_over_every_tie_order(u: list, e: list) -> np.ndarray:
    """The risk-coverage curve averaged over every order of the tied voxels (enumerated)."""
    import itertools

    groups = [[i for i in range(len(u)) if u[i] == v] for v in sorted(set(u))]
    curves = []
    for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = [i for g in orders for i in g]
        curves.append([sum(e[i] for i in order[:k]) / k for k in range(1, len(u) + 1)])
    return np.mean(curves, 0)


def test_tied_uncertainties_are_averaged_over_their_orders():
    """A map cannot rank voxels it gives one value: the curve is the mean over every order of each tie group
    (brute force: 3! x 2! x 3! = 72 orders), so it no longer depends on where the tied voxels lie."""
    u = [0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    e = [1, 0, 0, 0, 1, 1, 1, 0]
    _, risk = M.risk_coverage_curve(np.array(u), np.array(e, bool))
    np.testing.assert_allclose(risk, _risk_over_every_tie_order(u, e))
    flipped = M.aurc(np.array(u[::-1]), np.array(e[::-1], bool))  # the same voxels in another order
    assert flipped == pytest.approx(M.aurc(np.array(u), np.array(e, bool)))
    # all tied: every coverage gets the overall error rate
    np.testing.assert_allclose(M.risk_coverage_curve(np.zeros(8), np.array(e, bool))[1], np.full(8, np.mean(e)))


def test_risk_coverage_and_aurc_brute_force():
    rng = np.random.default_rng(3)
    unc = rng.permutation(63).reshape(7, 9).astype(float)  # no ties (ties: the test above)
    err = rng.random((7, 9)) < 0.35
    u, e = unc.ravel().tolist(), err.ravel().tolist()
    order = sorted(range(len(u)), key=lambda i: u[i])
    risks = []
    for k in range(1, len(u) + 1):
        risks.append(sum(e[i] for i in order[:k]) / k)
    coverage, risk = M.risk_coverage_curve(unc, err)
    np.testing.assert_allclose(coverage, np.arange(1, 64) / 63)
    np.testing.assert_allclose(risk, risks)
    assert risk[-1] == pytest.approx(err.mean())
    assert M.aurc(unc, err) == pytest.approx(sum(risks) / len(risks))
    # perfect ranking (errors most uncertain) beats the reverse ranking
    good = M.aurc(err.astype(float), err)
    bad = M.aurc(-err.astype(float), err)
    # errors-last minimises every risk_k, errors-first maximises it: any ranking lies in between
    assert good <= M.aurc(unc, err) <= bad and good < bad
    n_ok = int((~err).sum())
    assert good == pytest.approx(sum((k - n_ok) / k for k in range(n_ok + 1, 64)) / 63)
    # large N: the optimum approaches r + (1 - r) log(1 - r) (documented in aurc)
    big_err = np.arange(100_000) >= 80_000  # r = 0.2, errors last
    r = 0.2
    assert M.aurc(np.arange(100_000.0), big_err) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-4)
    # mask
    mask = rng.random((7, 9)) < 0.5
    _, risk_m = M.risk_coverage_curve(unc, err, mask=mask)
    um, em = unc[mask].tolist(), err[mask].tolist()
    order_m = sorted(range(len(um)), key=lambda i: um[i])
    np.testing.assert_allclose(risk_m, [sum(em[i] for i in order_m[:k]) / k for k in range(1, len(um) + 1)])
    assert math.isnan(M.aurc(unc, err, mask=np.zeros((7, 9), bool)))


# ------------------------------------------------------------------------------------------ decomposition
def test_au_eu_entanglement_is_spearman():
    rng = np.random.default_rng(4)
    a = rng.random((10, 12))
    b = np.round(0.5 * a + rng.random((10, 12)), 1)  # ties in b
    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    manual = np.corrcoef(ra, rb)[0, 1]
    assert M.au_eu_entanglement(a, b) == pytest.approx(manual)
    assert M.au_eu_entanglement(a, a ** 3) == pytest.approx(1.0)   # same ranking
    assert M.au_eu_entanglement(a, -a) == pytest.approx(-1.0)
    mask = rng.random((10, 12)) < 0.5
    manual_m = np.corrcoef(rankdata(a[mask]), rankdata(b[mask]))[0, 1]
    assert M.au_eu_entanglement(a, b, mask=mask) == pytest.approx(manual_m)
    assert math.isnan(M.au_eu_entanglement(a, np.ones_like(a)))
    assert math.isnan(M.au_eu_entanglement(a[:1, :1], b[:1, :1]))


# ------------------------------------------------------------------------------------------ multi-annotator
def _iou_ref(a, b):
    a, b = a != 0, b != 0
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


def test_generalized_energy_distance_brute_force():
    rng = np.random.default_rng(6)
    samples = rng.random((3, 6, 6)) < 0.4
    annot = rng.random((2, 6, 6)) < 0.4
    annot[1] = False  # an empty annotation
    d = lambda a, b: 1.0 - _iou_ref(a, b)  # noqa: E731
    e_sy = np.mean([d(s, y) for s in samples for y in annot])
    e_ss = np.mean([d(s, t) for s in samples for t in samples])
    e_yy = np.mean([d(y, z) for y in annot for z in annot])
    assert M.generalized_energy_distance(samples, annot) == pytest.approx(2 * e_sy - e_ss - e_yy)
    # identical sets -> 0; d(empty, empty) = 0
    assert M.generalized_energy_distance(annot, annot) == pytest.approx(0.0)
    empty = np.zeros((2, 4, 4), bool)
    assert M.generalized_energy_distance(empty, empty) == 0.0
    full = np.ones((1, 4, 4), bool)
    assert M.generalized_energy_distance(full, empty[:1]) == pytest.approx(2.0)  # 2 * 1 - 0 - 0


def test_generalized_energy_distance_multiclass_labels():
    a = np.array([[[1, 1, 2, 0]]])
    b = np.array([[[1, 0, 2, 2]]])
    # class 1: IoU = 1/2 ; class 2: IoU = 1/2 -> d = 1/2
    assert M.generalized_energy_distance(a, b, labels=[1, 2]) == pytest.approx(2 * 0.5)
    # binary foreground: a = {0,1,2}, b = {0,2,3} -> IoU = 2/4
    assert M.generalized_energy_distance(a, b) == pytest.approx(2 * 0.5)
    with pytest.raises(ValueError, match="labels"):
        M.generalized_energy_distance(a, b, labels=[0, 1])
    with pytest.raises(ValueError, match="spatial shape"):
        M.generalized_energy_distance(a, b[..., :3])


def test_hungarian_matched_iou_brute_force():
    rng = np.random.default_rng(7)
    samples = rng.random((2, 5, 5)) < 0.5
    annot = rng.random((4, 5, 5)) < 0.5
    # replicate to lcm(2, 4) = 4 and brute-force all permutations
    s_rep = [samples[i % 2] for i in range(4)]
    best = max(np.mean([_iou_ref(s_rep[i], annot[perm[i]]) for i in range(4)])
               for perm in itertools.permutations(range(4)))
    assert M.hungarian_matched_iou(samples, annot) == pytest.approx(best)
    # lcm(2, 3) = 6: 720 permutations
    annot3 = annot[:3]
    s6 = [samples[i % 2] for i in range(6)]
    a6 = [annot3[j % 3] for j in range(6)]
    best6 = max(np.mean([_iou_ref(s6[i], a6[perm[i]]) for i in range(6)])
                for perm in itertools.permutations(range(6)))
    assert M.hungarian_matched_iou(samples, annot3) == pytest.approx(best6)
    # a permutation of the annotators matches perfectly
    assert M.hungarian_matched_iou(annot[::-1], annot) == pytest.approx(1.0)
    assert M.hungarian_matched_iou(np.zeros((1, 3, 3), bool), np.zeros((2, 3, 3), bool)) == 1.0


# ------------------------------------------------------------------------------------------ whole alternatives
def _two_blobs():
    conflict = np.zeros((10, 10), bool)
    conflict[1:3, 1:3] = True   # blob A, 4 voxels
    conflict[6:9, 6:9] = True   # blob B, 9 voxels
    return conflict


def test_coherence_and_diversity_by_hand():
    conflict = _two_blobs()
    h = np.zeros((3, 10, 10), np.uint8)
    h[0][1:3, 1:3] = 3            # takes A whole, leaves B whole
    h[1][6:9, 6:9] = 3            # leaves A whole, takes B whole
    h[2][1, 1:3] = 3              # half of A (not whole), leaves B whole
    # pairs: (0,A) whole, (0,B) whole, (1,A) whole, (1,B) whole, (2,A) 0.5 partial, (2,B) whole -> 5/6
    assert M.hypothesis_coherence(h, conflict) == pytest.approx(5 / 6)
    assert M.hypothesis_diversity(h, conflict) == 1.0      # A taken by 0, left by 1; B taken by 1, left by 0
    assert M.hypothesis_diversity(h[[0, 2]], conflict) == 0.0  # nobody takes B
    assert M.hypothesis_coherence(h, np.zeros((10, 10), bool)) != M.hypothesis_coherence(h, np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="hypotheses"):
        M.hypothesis_coherence(h[0], conflict)


def test_coherence_counts_exactly_a_fifth_as_leaving_the_blob():
    """The documented bounds are inclusive: 1 of 5 voxels marked is "<= 20 %" (``f <= 1 - 0.8`` read 0.2 as above
    0.19999999999999996 and did not count it); 4 of 5 is ">= 80 %"."""
    conflict = np.zeros((1, 5), bool)
    conflict[0, :] = True
    h = np.zeros((2, 1, 5), np.uint8)
    h[0, 0, :1] = 1  # a fifth
    h[1, 0, :4] = 1  # four fifths
    assert M.hypothesis_coherence(h, conflict) == 1.0 and M.hypothesis_diversity(h, conflict) == 1.0


def test_coherence_against_a_loop():
    rng = np.random.default_rng(3)
    conflict = _two_blobs()
    h = (rng.random((6, 10, 10)) < 0.5).astype(np.uint8)
    labels, n = __import__("scipy.ndimage", fromlist=["label"]).label(conflict)
    pairs = [(h[k][labels == b] != 0).mean() for k in range(6) for b in range(1, n + 1)]
    expected = np.mean([f >= 0.8 or f <= 0.2 for f in pairs])
    assert M.hypothesis_coherence(h, conflict) == pytest.approx(expected)


def test_lesion_edges_by_hand():
    """A 3x3 square: dilated by the face-connected element it has 21 voxels, eroded 1 (its centre): 20 edge
    voxels on both sides of the boundary; excluding a voxel next to it with margin 1 removes one more."""
    labels = np.zeros((9, 9), np.uint8)
    labels[3:6, 3:6] = 2
    edges = M.lesion_edges(labels)
    assert edges.sum() == 20 and not edges[4, 4] and edges[2, 4] and edges[3, 3] and not edges[2, 2]
    exclude = np.zeros_like(labels)
    exclude[3, 1] = 1
    fewer = M.lesion_edges(labels, exclude=exclude, margin=1)
    assert fewer.sum() == 19 and not fewer[3, 2]
    assert M.lesion_edges(np.zeros((5, 5))).sum() == 0
    with pytest.raises(ValueError):
        M.lesion_edges(labels, width=0)
