"""Each term of the VAE loss (Eq. 2-8) against a hand-computed case, and the Eq. 1 combination with its schedules."""
import dataclasses
import math

import pytest
import torch

from pgesam_train.config import VAELossConfig
from pgesam_train.losses import (attractive_loss, classification_loss, kl_loss, loss_terms, neighbour_loss,
                                 reconstruction_loss, regularization_loss, repulsive_loss, term_weights, vae_loss)


def test_reconstruction_is_elementwise_mse():
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    assert reconstruction_loss(torch.zeros_like(target), target).item() == pytest.approx((1 + 4 + 9 + 16) / 4)


def test_kl_sums_over_axes_and_reduces_over_the_batch():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]])
    # sample 0: (1 + 1 - 0 - 1) + 0 = 1; sample 1: (0 + 2 - ln 2 - 1) + 0 = 1 - ln 2; half of each
    assert kl_loss(mu, logvar, "sum").item() == pytest.approx(0.5 * (2 - math.log(2.0)))
    assert kl_loss(mu, logvar, "mean").item() == pytest.approx(0.25 * (2 - math.log(2.0)))
    assert kl_loss(mu, logvar).item() == kl_loss(mu, logvar, "mean").item()
    assert kl_loss(torch.zeros(5, 2), torch.zeros(5, 2)).item() == 0.0
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        kl_loss(mu, logvar, "max")


def test_regularization_penalises_only_outside_unit_circle():
    mu = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])  # norms 5, 0.5, 2
    assert regularization_loss(mu).item() == pytest.approx((4 + 0 + 1) / 3)


MU = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1.0, 0.0], [0.0, 0.2]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_attractive_averages_squared_distance_of_same_class_pairs():
    # ordered pairs j != i of one class: (0,1), (1,0): d^2 = 0.01; (2,3), (3,2): d^2 = 1.04
    expected = (2 * 0.01 + 2 * 1.04) / (4 + 1e-6)
    assert attractive_loss(MU, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_repulsive_penalises_other_class_pairs_inside_margin():
    # 8 ordered cross pairs; inside M = 0.25 only (0,3): d = 0.2 and (1,3): d = sqrt(0.05), each twice
    expected = 2 * ((0.25 - 0.2) ** 2 + (0.25 - math.sqrt(0.05)) ** 2) / (8 + 1e-6)
    assert repulsive_loss(MU, LABELS, margin=0.25).item() == pytest.approx(expected, rel=1e-5)
    assert neighbour_loss(MU, LABELS).item() == pytest.approx(
        attractive_loss(MU, LABELS).item() + expected, rel=1e-5)


def test_neighbour_excludes_the_diagonal():
    # one sample per class: no same-class pair with j != i, so nothing attracts (the authors' code counts i == j)
    mu = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert attractive_loss(mu, torch.tensor([0, 1])).item() == 0.0
    assert repulsive_loss(torch.zeros(1, 2), torch.tensor([0])).item() == 0.0


def test_repulsive_gradient_is_finite_at_coinciding_points():
    mu = torch.zeros(2, 2, requires_grad=True)
    repulsive_loss(mu, torch.tensor([0, 1])).backward()
    assert torch.isfinite(mu.grad).all()


def test_classification_is_cross_entropy():
    assert classification_loss(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(math.log(2))
    logits = torch.tensor([[math.log(3.0), 0.0]])  # softmax (3/4, 1/4)
    assert classification_loss(logits, torch.tensor([1])).item() == pytest.approx(math.log(4))


def test_term_weights_follow_table1_and_the_schedules():
    w = term_weights(VAELossConfig(), 0.25)
    assert w["rec"] == 0.2 and w["kl"] == 0.0039 and w["reg"] == 1.0 and w["pitch"] == 0.07
    assert w["nei"] == pytest.approx(0.6 * 0.25 ** 0.5)
    assert w["inst"] == pytest.approx(0.12 * 0.25 ** 0.8)
    assert w["fam"] == pytest.approx(2.0 * 0.75 ** 1.5)  # the paper's (1 - gamma)^1.5, not 1 - gamma^1.5
    w0 = term_weights(VAELossConfig(), 0.0)
    assert w0["nei"] == 0.0 and w0["inst"] == 0.0 and w0["fam"] == 2.0
    with pytest.raises(ValueError, match="gamma"):
        term_weights(VAELossConfig(), 1.5)


@pytest.mark.parametrize("switch", ["use_kl", "use_reg", "use_nei", "use_fam"])
def test_switches_zero_their_term(switch):
    w = term_weights(dataclasses.replace(VAELossConfig(), **{switch: False}), 0.5)
    assert w[switch[4:]] == 0.0
    assert sum(v == 0.0 for v in w.values()) == 1


def test_vae_loss_is_the_weighted_sum():
    cfg, gamma = VAELossConfig(), 0.5
    terms = {k: torch.tensor(float(i + 1)) for i, k in enumerate(["rec", "kl", "reg", "nei", "pitch", "fam"])}
    w = term_weights(cfg, gamma)
    expected = sum(w[k] * v.item() for k, v in terms.items())
    assert vae_loss(terms, cfg, gamma).item() == pytest.approx(expected)
    off = dataclasses.replace(cfg, use_rec=False)
    assert vae_loss(terms, off, gamma).item() == pytest.approx(expected - w["rec"] * 1.0)


def test_loss_terms_leaves_out_instruments_of_held_out_splits():
    b = 4
    out = {"mu": MU, "logvar": torch.zeros(b, 2), "pitch_logits": torch.zeros(b, 25),
           "inst_logits": torch.zeros(b, 3), "fam_logits": torch.zeros(b, 11)}
    args = (torch.zeros(b, 8, 5), torch.zeros(b, 8, 5), torch.zeros(b, dtype=torch.long), LABELS,
            torch.zeros(b, dtype=torch.long), VAELossConfig())
    assert set(loss_terms(out, *args)) == {"rec", "kl", "reg", "nei", "pitch", "inst", "fam"}
    held_out = loss_terms(out, *args, with_inst=False)
    assert "inst" not in held_out
    assert held_out["pitch"].item() == pytest.approx(math.log(25))
