"""HistoryNet's losses (the paper's eq. 1), as the official Keras code computes them
(BestiVictory/HistoryNet, SOURCE_HistoryNet/HistoryNet.py):

    G:  w.l2_ab * L2(ab) + w.class_kl * KL(label || softmax(G2)) + w.parsing_l2 * L2(parsing)
        + w.wgan * (-mean D1(L, ab_fake)) + w.info_kl * KL(z || D2(ab_fake))
    D1: mean D1(L, ab_fake) - mean D1(L, ab_real) + 10 * mean((1 - |grad D1(L, ab_mixed)|)^2)
    D2: KL(z || D2(ab_fake)), with G fixed

Each training step updates G, D1 and D2 in turn, each with its own optimiser; the caller clears the
gradients the G loss leaves on D1 and D2. Every reduction runs in float32, whatever the autocast dtype
of the networks' outputs. Logged terms are unweighted, detached 0-dim tensors (no device sync here).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import GeneratorOutput

GRADIENT_PENALTY_WEIGHT = 10.0
KERAS_EPSILON = 1e-7  # keras.losses.kld clips both sides to [epsilon, 1]


@dataclass(frozen=True)
class LossWeights:
    l2_ab: float
    class_kl: float
    parsing_l2: float
    wgan: float
    info_kl: float


LOSS_PRESETS = {
    "paper": LossWeights(l2_ab=1.0, class_kl=0.003, parsing_l2=0.003, wgan=0.1, info_kl=0.003),  # eq. 1
    # combined.compile(loss_weights=[2.0, 0.002, -0.1, 0.002, 0.002, 0.0]); the 0.0 is an unused output
    "official": LossWeights(l2_ab=2.0, class_kl=0.002, parsing_l2=0.002, wgan=0.1, info_kl=0.002),
    # not the paper's: the plain regression baseline, to tell what the other terms add (or cost)
    "l2": LossWeights(l2_ab=1.0, class_kl=0.0, parsing_l2=0.0, wgan=0.0, info_kl=0.0),
    # not the paper's: eq. 1 with D1's weight a tenth and D2's a tenth of the paper's; at the paper's, the
    # critics' terms held the full model at grey's PSNR in benchmarks/historynet_learning.py (RESULTS.md)
    "recommended": LossWeights(l2_ab=1.0, class_kl=0.003, parsing_l2=0.003, wgan=0.01, info_kl=0.0003),
}


# -- terms --------------------------------------------------------------------------------------
def masked_mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the samples where `mask` is True; 0 (not NaN) when there are none."""
    total = torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
    return total / mask.sum().clamp(min=1)


def class_kl(logits: torch.Tensor, labels: torch.Tensor, has_label: torch.Tensor) -> torch.Tensor:
    """KL(one-hot label || softmax(logits)) = -log p(label), over the labelled samples. Keras' kld would
    also clip p at 1e-7 (capping the term at 16.1 and stopping its gradient there); log_softmax needs no clip."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    safe_labels = torch.where(has_label, labels, torch.zeros_like(labels))  # unlabelled may be -1
    return masked_mean(-log_probs.gather(1, safe_labels[:, None]).squeeze(1), has_label)


def keras_kld(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """keras.losses.kld per sample: sum(t * log(t / p)) with t and p clipped to [1e-7, 1]. The official
    code applies it to z and D2's output as they are, linear vectors rather than distributions:
    components outside [1e-7, 1] count as the clip value and pass no gradient. Ported unchanged."""
    t = target.float().clamp(KERAS_EPSILON, 1.0)
    p = pred.float().clamp(KERAS_EPSILON, 1.0)
    return (t * (t / p).log()).sum(dim=1)


def softmax_kld(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(pred)) per sample: the info term between distributions, with a
    gradient everywhere (not the paper's: `keras_kld` clips raw vectors)."""
    log_t, log_p = F.log_softmax(target.float(), dim=1), F.log_softmax(pred.float(), dim=1)
    return (log_t.exp() * (log_t - log_p)).sum(dim=1)


# --info-term: how the generator's z and D2's recovery of it are compared
INFO_TERMS = {"official": keras_kld, "softmax": softmax_kld}


def parsing_l2(pred: torch.Tensor, target: torch.Tensor, has_parsing: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, averaged over the images that have a parsing target."""
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    return masked_mean(per_sample, has_parsing)


def gradient_penalty(scores: torch.Tensor, mixed_ab: torch.Tensor, weight: float = GRADIENT_PENALTY_WEIGHT,
                     loss_scale: float = 1.0) -> torch.Tensor:
    """weight * mean over samples of (1 - |d sum(scores) / d mixed_ab|)^2, as the official
    gradient_penalty_loss (the norm runs over all of a sample's ab values; L is not differentiated).
    Under fp16 `loss_scale` is the GradScaler's scale: the inner gradient is taken of the scaled scores
    and divided back, so that it does not underflow in float16 (an overflow makes the penalty inf, and
    the scaler then skips the step)."""
    grads, = torch.autograd.grad(scores.sum() * loss_scale, mixed_ab, create_graph=True)
    norms = (grads.float() / loss_scale).flatten(1).norm(dim=1)
    return weight * (1.0 - norms).square().mean()


# -- the three losses ---------------------------------------------------------------------------
Critic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def generator_loss(out: GeneratorOutput, l: torch.Tensor, ab: torch.Tensor, critic: Critic, *,
                   labels: torch.Tensor, has_label: torch.Tensor,
                   parsing: torch.Tensor | None = None, has_parsing: torch.Tensor | None = None,
                   info_classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   weights: LossWeights = LOSS_PRESETS["paper"],
                   info_term: str = "official") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total, unweighted terms and 'total') for one generator step.

    l, ab: (B, 1, S, S) and (B, 2, S, S), L/255 and the true ab/255. labels: (B,) int64 class indices,
    has_label: (B,) bool (unlabelled samples add nothing). parsing, has_parsing: the (B, 1, S, S) target
    and its (B,) mask, required when the generator has the parsing branch. info_classifier: D2, or None
    for the variants without it (no info term)."""
    terms = {
        "l2_ab": F.mse_loss(out.ab.float(), ab.float()),
        "class_kl": class_kl(out.class_logits, labels, has_label),
        # official wasserstein_loss = mean(D1), weighted -0.1 for G: G raises the critic's score
        "wgan": -critic(l, out.ab).float().mean(),
    }
    if out.parsing is not None:
        if parsing is None or has_parsing is None:
            raise ValueError("the generator has a parsing branch: give parsing and has_parsing")
        terms["parsing_l2"] = parsing_l2(out.parsing, parsing, has_parsing)
    if info_classifier is not None:
        # official target: z as a constant (Keras predicts it first), so G is pushed through ab only
        terms["info_kl"] = INFO_TERMS[info_term](out.z.detach(), info_classifier(out.ab)).mean()
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, logged(terms, total)


def critic_loss(critic: Critic, l: torch.Tensor, real_ab: torch.Tensor, fake_ab: torch.Tensor,
                gp_weight: float = GRADIENT_PENALTY_WEIGHT,
                loss_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, terms 'real', 'fake', 'gradient_penalty', 'total') for one D1 step, WGAN-GP. The mixed
    samples interpolate ab between real and fake with one uniform weight per sample; L goes through
    unchanged (ChromaGAN's RandomWeightedAverage). `loss_scale`: see gradient_penalty."""
    fake_ab = fake_ab.detach()
    alpha = torch.rand(real_ab.shape[0], 1, 1, 1, device=real_ab.device, dtype=real_ab.dtype)
    mixed_ab = (alpha * real_ab + (1 - alpha) * fake_ab).requires_grad_(True)
    # D1 has no normalisation layer, so one pass over [real; fake; mixed] equals three passes
    scores = critic(l.repeat(3, 1, 1, 1), torch.cat([real_ab, fake_ab, mixed_ab]))
    real, fake, mixed = scores.chunk(3)
    terms = {"real": real.float().mean(), "fake": fake.float().mean(),
             "gradient_penalty": gradient_penalty(mixed, mixed_ab, gp_weight, loss_scale)}
    total = terms["fake"] - terms["real"] + terms["gradient_penalty"]
    return total, logged(terms, total)


def info_classifier_loss(info_classifier: Callable[[torch.Tensor], torch.Tensor], fake_ab: torch.Tensor,
                         z: torch.Tensor, info_term: str = "official") -> torch.Tensor:
    """D2's loss: recover G2's z from the generated colours, G fixed (official classcification_model,
    kld with weight 1 against the z the generator predicted)."""
    return INFO_TERMS[info_term](z.detach(), info_classifier(fake_ab.detach())).mean()


def logged(terms: dict[str, torch.Tensor], total: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in {**terms, "total": total}.items()}
