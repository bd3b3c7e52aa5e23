"""HistoryNet's losses on hand-made tensors, each value worked out by hand in the test."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mhmd_builder.historynet.losses import (INFO_TERMS, LOSS_PRESETS, LossWeights, class_kl, critic_loss,
                                            generator_loss, gradient_penalty, info_classifier_loss, keras_kld,
                                            parsing_l2)
from mhmd_builder.historynet.model import GeneratorOutput

LN3 = math.log(3.0)  # logits (0, ln 3) -> softmax (1/4, 3/4)


def test_presets_are_the_papers_the_official_codes_and_the_recommended_weights():
    assert LOSS_PRESETS["paper"] == LossWeights(l2_ab=1.0, class_kl=0.003, parsing_l2=0.003, wgan=0.1, info_kl=0.003)
    assert LOSS_PRESETS["official"] == LossWeights(l2_ab=2.0, class_kl=0.002, parsing_l2=0.002, wgan=0.1,
                                                   info_kl=0.002)
    assert LOSS_PRESETS["l2"] == LossWeights(l2_ab=1.0, class_kl=0.0, parsing_l2=0.0, wgan=0.0, info_kl=0.0)
    assert LOSS_PRESETS["recommended"] == LossWeights(l2_ab=1.0, class_kl=0.003, parsing_l2=0.003, wgan=0.01,
                                                      info_kl=0.0003)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LOSS_PRESETS["paper"].wgan = 1.0


def test_class_kl_is_minus_log_p_of_the_label_over_labelled_samples_only():
    logits = torch.tensor([[0.0, LN3], [0.0, LN3], [50.0, -50.0]])
    labels = torch.tensor([1, 0, -1])  # the third is unlabelled: its -1 must not be used as an index
    loss = class_kl(logits, labels, torch.tensor([True, True, False]))
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)


def test_class_kl_of_a_batch_without_labels_is_zero_and_its_gradient_finite():
    logits = torch.randn(2, 42, requires_grad=True)
    loss = class_kl(logits, torch.tensor([-1, -1]), torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 42))


def test_keras_kld_clips_both_sides_to_epsilon_and_one():
    # a true KL where both are distributions: 0.2 ln(0.2/0.5) + 0.8 ln(0.8/0.5)
    assert keras_kld(torch.tensor([[0.2, 0.8]]), torch.tensor([[0.5, 0.5]])).item() == pytest.approx(
        0.2 * math.log(0.4) + 0.8 * math.log(1.6), rel=1e-6)
    target = torch.tensor([[0.5, 0.5, 0.5, 0.5, -3.0]])
    pred = torch.tensor([[0.25, 0.5, 2.0, -1.0, 0.5]], requires_grad=True)
    # p: 2.0 -> 1 and -1.0 -> 1e-7; t: -3.0 -> 1e-7
    expected = (0.5 * math.log(2) + 0 + 0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-7)
                + 1e-7 * math.log(1e-7 / 0.5))
    loss = keras_kld(target, pred)
    loss.sum().backward()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # d/dp = -t/p inside the clip range, nothing outside it
    assert pred.grad[0].tolist() == pytest.approx([-2.0, -1.0, 0.0, 0.0, -2e-7], abs=1e-6)


def test_parsing_l2_averages_over_the_images_that_have_a_target():
    pred = torch.zeros(3, 1, 4, 4)
    target = torch.stack([torch.full((1, 4, 4), v) for v in (0.5, 1.0, 3.0)])
    assert parsing_l2(pred, target, torch.tensor([True, True, False])).item() == pytest.approx((0.25 + 1.0) / 2)
    assert parsing_l2(pred, target, torch.tensor([False, False, False])).item() == 0.0


@pytest.mark.parametrize("norms, expected", [((1.0, 1.0), 0.0), ((3.0, 3.0), 40.0), ((1.0, 3.0), 20.0)])
def test_gradient_penalty_of_a_linear_critic(norms, expected):
    """A critic linear in ab has the same gradient everywhere: |w| per sample; 10 * mean((1 - |w|)^2)."""
    mixed = torch.rand(2, 2, 4, 4, requires_grad=True)
    direction = torch.randn(2, 4, 4)
    direction = direction / direction.norm()
    weights = torch.stack([n * direction for n in norms])
    scores = (mixed * weights).sum(dim=(1, 2, 3))
    assert gradient_penalty(scores, mixed).item() == pytest.approx(expected, abs=1e-4)


def test_gradient_penalty_sums_over_a_patch_map():
    mixed = torch.rand(1, 2, 4, 4, requires_grad=True)
    patches = 2 * mixed[:, :1]  # (1, 1, 4, 4): d sum / d mixed is 2 at 16 places -> norm 8
    assert gradient_penalty(patches, mixed).item() == pytest.approx(10 * (1 - 8) ** 2)


def test_gradient_penalty_under_a_loss_scale_is_the_same_penalty():
    """fp16 training takes the inner gradient of the scaled scores (so it does not underflow) and divides
    the scale back out: the penalty, and the critic's gradients from it, do not change."""
    critic = torch.nn.Conv2d(2, 1, 3)
    mixed = torch.rand(2, 2, 6, 6, requires_grad=True)
    penalties, grads = [], []
    for scale in (1.0, 2.0 ** 16):
        penalty = gradient_penalty(critic(mixed), mixed, loss_scale=scale)
        penalties.append(penalty.item())
        grads.append(torch.autograd.grad(penalty, critic.weight)[0])
    assert penalties[0] == pytest.approx(penalties[1], rel=1e-6) and penalties[0] > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_critic_loss_is_wgan_gp_with_l_passed_through():
    """critic(l, ab) = c * (sum ab + sum l): real ab 1, fake ab 0, l 0.25 on 2x4x4 / 1x4x4 maps, so the
    scores are c * (32 + 4) and c * 4 and the gradient in ab has norm c * sqrt(32) whatever the mix."""
    c = 2 / math.sqrt(32)

    def critic(l, ab):
        return c * (ab.sum(dim=(1, 2, 3)) + l.sum(dim=(1, 2, 3))).view(-1, 1, 1, 1)

    l = torch.full((2, 1, 4, 4), 0.25)
    fake = torch.zeros(2, 2, 4, 4, requires_grad=True)
    total, terms = critic_loss(critic, l, torch.ones(2, 2, 4, 4), fake)
    assert terms["real"].item() == pytest.approx(c * 36) and terms["fake"].item() == pytest.approx(c * 4)
    assert terms["gradient_penalty"].item() == pytest.approx(10 * (1 - 2) ** 2, rel=1e-5)
    assert total.item() == pytest.approx(c * 4 - c * 36 + 10, rel=1e-5) == terms["total"].item()
    total.backward()
    assert fake.grad is None  # the D1 step never reaches the generator


def hand_made_output(parsing: bool = True) -> GeneratorOutput:
    return GeneratorOutput(ab=torch.full((2, 2, 4, 4), 0.5, requires_grad=True),
                           class_logits=torch.tensor([[0.0, LN3], [0.0, LN3]], requires_grad=True),
                           z=torch.tensor([[0.5, 0.5], [0.5, 0.5]], requires_grad=True),
                           parsing=torch.full((2, 1, 4, 4), 0.2) if parsing else None)


def sum_critic(l, ab):
    return ab.sum(dim=(1, 2, 3), keepdim=True)  # 0.5 * 32 = 16 per sample


def fixed_info_classifier(ab):
    return torch.tensor([[0.25, 0.5], [0.25, 0.5]]) + 0 * ab.mean()  # KL(z || .) = 0.5 ln 2 per sample


@pytest.mark.parametrize("preset", ["paper", "official", "l2"])
def test_generator_loss_weights_the_hand_computed_terms(preset):
    out = hand_made_output()
    expected_terms = {"l2_ab": 0.0625, "class_kl": math.log(4 / 3), "parsing_l2": 0.04, "wgan": -16.0,
                      "info_kl": 0.5 * math.log(2)}
    w = LOSS_PRESETS[preset]
    total, terms = generator_loss(out, torch.zeros(2, 1, 4, 4), torch.full((2, 2, 4, 4), 0.25), sum_critic,
                                  labels=torch.tensor([1, 0]), has_label=torch.tensor([True, False]),
                                  parsing=torch.zeros(2, 1, 4, 4), has_parsing=torch.tensor([True, True]),
                                  info_classifier=fixed_info_classifier, weights=w)
    expected_total = (w.l2_ab * 0.0625 + w.class_kl * math.log(4 / 3) + w.parsing_l2 * 0.04 - w.wgan * 16
                      + w.info_kl * 0.5 * math.log(2))
    assert {k: v.item() for k, v in terms.items()} == pytest.approx({**expected_terms, "total": expected_total})
    assert total.item() == pytest.approx(expected_total)
    total.backward()
    assert out.z.grad is None  # z is D2's target, a constant as in the official code
    assert out.ab.grad is not None and out.class_logits.grad is not None


def test_generator_loss_is_the_papers_by_default_and_drops_the_terms_of_missing_branches():
    total, terms = generator_loss(hand_made_output(parsing=False), torch.zeros(2, 1, 4, 4),
                                  torch.full((2, 2, 4, 4), 0.25), sum_critic,
                                  labels=torch.tensor([1, 0]), has_label=torch.tensor([False, False]))
    assert set(terms) == {"l2_ab", "class_kl", "wgan", "total"}
    assert terms["class_kl"].item() == 0.0
    assert total.item() == pytest.approx(0.0625 - 0.1 * 16)


def test_generator_loss_wants_parsing_targets_when_the_generator_parses():
    with pytest.raises(ValueError, match="parsing"):
        generator_loss(hand_made_output(), torch.zeros(2, 1, 4, 4), torch.full((2, 2, 4, 4), 0.25), sum_critic,
                       labels=torch.tensor([1, 0]), has_label=torch.tensor([True, True]))


def test_the_softmax_info_term_is_the_kl_between_the_two_distributions():
    target, pred = torch.tensor([[0.0, LN3]]), torch.tensor([[5.0, 5.0]])  # (1/4, 3/4) against (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert INFO_TERMS["softmax"](target, pred).item() == pytest.approx(expected, rel=1e-6)
    assert INFO_TERMS["softmax"](target, target + 7.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-free
    out = hand_made_output()  # z (0.5, 0.5) against D2's (0.25, 0.5): softmax KL, not the clipped one
    _, terms = generator_loss(out, torch.zeros(2, 1, 4, 4), torch.full((2, 2, 4, 4), 0.25), sum_critic,
                              labels=torch.tensor([1, 0]), has_label=torch.tensor([True, False]),
                              parsing=torch.zeros(2, 1, 4, 4), has_parsing=torch.tensor([True, True]),
                              info_classifier=fixed_info_classifier, info_term="softmax")
    p = torch.softmax(torch.tensor([0.25, 0.5]), 0)
    assert terms["info_kl"].item() == pytest.approx((0.5 * (0.5 / p).log()).sum().item(), rel=1e-4)


def test_info_classifier_loss_trains_d2_only():
    d2 = nn.Sequential(nn.Flatten(), nn.Linear(32, 2))
    with torch.no_grad():
        d2[1].weight.zero_()
        d2[1].bias.copy_(torch.tensor([0.25, 0.5]))
    fake_ab = torch.rand(2, 2, 4, 4, requires_grad=True)
    z = torch.tensor([[0.5, 0.5], [0.5, 0.5]], requires_grad=True)
    loss = info_classifier_loss(d2, fake_ab, z)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * math.log(2))
    assert d2[1].bias.grad.tolist() == pytest.approx([-2.0, -1.0])  # mean over samples of -t/p
    assert fake_ab.grad is None and z.grad is None
