"""The channels EnTrustPredictor hands to nnU-Net's sliding window (cheap: no trained model)."""
import torch
from torch import nn

from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.nnunet.predictor import POOLED_MAPS, TrustStatistics, pooled_maps, pooling_channels


def test_head_confidence_survives_nnunets_float16_accumulator():
    """nnU-Net pools every channel in float16 (step 4.9e-4 near 1): a confidence of 0.99999 must come back as
    0.99999, not 1 (CalibHead reads log(1 - c)); the other maps pass unchanged."""
    c = torch.tensor([0.9, 0.999, 0.9999, 0.99999, 0.5]).view(1, 5, 1)
    stats = {k: torch.full_like(c, 0.25) for k in POOLED_MAPS} | {"head_confidence": c}
    channels = torch.cat(pooling_channels(stats), 1)[0]  # (maps, 5, 1) as nnU-Net sees them
    back = pooled_maps(channels.half())  # what nnU-Net's accumulator keeps
    torch.testing.assert_close(1 - back["head_confidence"], 1 - c[0], rtol=1e-3, atol=0)
    assert float(c[0, 3].half()) == 1.0  # the plain channel would have lost it
    for k in POOLED_MAPS[:-1]:
        torch.testing.assert_close(back[k], torch.full_like(c[0], 0.25))


def test_the_wrapped_network_hands_nnunet_the_pooling_channels():
    """A plain network's patch output through TrustStatistics: mean probabilities, then pooling_channels."""
    torch.manual_seed(0)
    net = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        net.weight.mul_(40)  # near one-hot: confidences within 1e-4 of 1
    wrapped = TrustStatistics(net, SamplingSettings(num_hypotheses=1, probe=False))
    x = torch.randn(1, 2, 8, 8)
    out = wrapped(x)
    p = torch.softmax(net(x), 1)
    torch.testing.assert_close(out[:, :3], p)
    head_doubt = out[:, 3 + POOLED_MAPS.index("head_confidence")]
    torch.testing.assert_close(head_doubt, 1 - p.amax(1))
    doubt, back = 1 - p.amax(1)[0], 1 - pooled_maps(out[0, 3:].half())["head_confidence"]
    sel = (doubt > 1e-5) & (doubt < 5e-4)  # what a float16 confidence channel would have rounded to 0
    assert sel.sum() >= 3
    torch.testing.assert_close(back[sel], doubt[sel], rtol=1e-2, atol=0)


def test_aleatoric_and_epistemic_are_made_after_pooling():
    """The UQ study's split on pooled numbers: per fold aleatoric = H(p_f) - its own models' spread; epistemic =
    H(mean_f p_f) - mean aleatoric. One EnTrust fold: epistemic 0 whatever its mirrorings and patches did (they are
    averaged into p_f first); two folds that disagree: their Jensen-Shannon divergence."""
    from entrust_nnunet.model.trustmap import jensen_shannon, output_entropy
    from entrust_nnunet.nnunet.predictor import fold_aleatoric

    p1 = torch.tensor([0.9, 0.05, 0.05]).view(3, 1, 1)
    p2 = torch.tensor([0.1, 0.8, 0.1]).view(3, 1, 1)
    zero = torch.zeros(1, 1)
    one = fold_aleatoric(p1, zero, False)
    torch.testing.assert_close(one, output_entropy(p1, 0, False))  # epistemic = H(p1) - this = 0
    two = (fold_aleatoric(p1, zero, False) + fold_aleatoric(p2, zero, False)) / 2
    epistemic = output_entropy((p1 + p2) / 2, 0, False) - two
    torch.testing.assert_close(epistemic, jensen_shannon(torch.stack([p1, p2]), member_axis=0, class_axis=1))
    assert float(epistemic) > 0.3
    # MC dropout's passes disagree within the patch: their spread leaves the aleatoric part
    spread = torch.full((1, 1), 0.2)
    torch.testing.assert_close(fold_aleatoric(p1, spread, False), output_entropy(p1, 0, False) - 0.2)
    # regions: a sigmoid per channel, their binary entropies summed
    r = torch.tensor([0.5, 0.99]).view(2, 1, 1)
    assert float(fold_aleatoric(r, zero, True)) > float(fold_aleatoric(r[1:], zero, True))


def test_a_plain_network_has_no_model_spread_and_mc_dropout_its_passes_mutual_information():
    from entrust_nnunet.model.trustmap import output_entropy
    from entrust_nnunet.nnunet.predictor import uncertainty_statistics

    net = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        s = uncertainty_statistics(net, torch.randn(1, 2, 4, 4), SamplingSettings(num_hypotheses=1, probe=False))
    assert float(s["model_spread"].abs().max()) == 0.0

    class Passes(nn.Module):  # two passes that disagree completely
        def sample_statistics(self, x, num_hypotheses, seed, regions):
            a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
            hyps = torch.stack([a, b]).view(2, 1, 2, 1, 1).expand(2, 1, 2, 4, 4)
            return {"mean": hyps.mean(0), "aleatoric": torch.zeros(1, 4, 4), "hypotheses": hyps}

    s = uncertainty_statistics(Passes(), torch.randn(1, 2, 4, 4), SamplingSettings(num_hypotheses=2, probe=False))
    torch.testing.assert_close(s["model_spread"], output_entropy(torch.full((1, 2, 4, 4), 0.5), 1, False))


def test_the_absence_warning_says_how_the_network_treats_an_absent_modality():
    """EnTrust masks an absent modality's stream; any other network (the zero-filled baselines) sees zeros: the
    warning line says which."""
    from types import SimpleNamespace

    from entrust_nnunet.data.modalities import case_modalities
    from entrust_nnunet.model.network import EnTrustUNet
    from entrust_nnunet.nnunet.predictor import EnTrustPredictor

    info = case_modalities({"c1": ["a.nii.gz", None]}, {"0": "T1", "1": "FLAIR"}, [])["c1"]
    plain = SimpleNamespace(network=SimpleNamespace(net=nn.Conv2d(2, 3, 1)))
    entrust = SimpleNamespace(network=SimpleNamespace(net=EnTrustUNet.__new__(EnTrustUNet)))
    how = [("masked" if EnTrustPredictor.masks_absent_modalities.fget(p) else "zero-filled after normalisation")
           for p in (entrust, plain)]
    assert [info.warning(h) for h in how] == [
        f"entrust: warning: case c1: predicting without FLAIR (FLAIR: no file); absent modalities are {h}"
        for h in ("masked", "zero-filled after normalisation")]
