"""Multi-label losses for tagger training: BCE and Asymmetric Loss (ASL).

Why our own ASL: the reference implementation returns NaN under fp16 autocast
(Alibaba-MIIL/ASL #53) because ``log`` of a half-precision probability underflows.
Here logits are cast to float32 first and probabilities are clamped before the log,
so the loss is finite in fp16/bf16 runs too.
"""

from __future__ import annotations

import torch
from torch import nn


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al. 2021): focusing ``gamma_neg`` on negatives, ``gamma_pos`` on positives,
    and probability shifting ``clip`` that discards very easy negatives.

    Returns the sum over tags averaged over the batch (the paper sums; averaging over
    the batch keeps the learning rate independent of the batch size). With
    ``gamma_neg=gamma_pos=clip=0`` it equals BCE summed over tags.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 eps: float = 1e-8) -> None:
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1:
            raise ValueError(
                f"ASL needs gamma_neg >= 0, gamma_pos >= 0 and 0 <= clip < 1; got "
                f"gamma_neg={gamma_neg}, gamma_pos={gamma_pos}, clip={clip}"
            )
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        targets = targets.float()
        probabilities = torch.sigmoid(logits)
        positive = probabilities
        negative = 1.0 - probabilities
        if self.clip > 0:
            negative = (negative + self.clip).clamp(max=1.0)
        loss_positive = targets * torch.log(positive.clamp(min=self.eps))
        loss_negative = (1.0 - targets) * torch.log(negative.clamp(min=self.eps))
        loss = loss_positive + loss_negative
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            # The focusing weight is a constant for the gradient, as in the paper's code.
            with torch.no_grad():
                pt = positive * targets + negative * (1.0 - targets)
                gamma = self.gamma_pos * targets + self.gamma_neg * (1.0 - targets)
                weight = torch.pow((1.0 - pt).clamp(min=0.0), gamma)
            loss = loss * weight
        return -loss.sum() / logits.shape[0]


class BCELoss(nn.Module):
    """Sigmoid BCE on float32 logits, summed over tags and averaged over the batch.

    Summing over tags (like ASL) keeps the gradient scale comparable between the two
    losses, so switching the loss does not need a new learning rate.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), targets.float(), reduction="sum"
        )
        return loss / logits.shape[0]


def build_loss(name: str, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05) -> nn.Module:
    """The loss module a config names (``bce`` or ``asl``)."""
    if name == "bce":
        return BCELoss()
    if name == "asl":
        return AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    raise ValueError(f"unknown loss {name!r}; use 'bce' or 'asl'")
