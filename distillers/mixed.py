"""Mixed supervision (SPEC section 3, Eq 6-8): how much the ground-truth loss counts per sample.

R = L_gt / L_distill per sample (computed without gradient); the total loss is
L = L_distill + w(R) L_gt. The published w is not readable, so the adaptive form below is our
reading of the text (SPEC), and every weight is a small swappable class named by `class_path`:

    Fixed(x)                                 w = x
    AdaptiveUnlimited(alpha, beta)           w = beta R^alpha
    Adaptive(alpha, beta, r_peak, r_dead)    w = beta R^alpha                                R <= R_p
                                             w = beta R_p^alpha (R_d - R) / (R_d - R_p)     R_p < R < R_d
                                             w = 0                                           R >= R_d
"""
from __future__ import annotations

import torch


class GTWeight:
    """w(R) for a (B,) tensor of loss ratios R >= 0 -> (B,) weights."""

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Fixed(GTWeight):
    def __init__(self, weight: float = 0.2):
        self.weight = weight

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        return torch.full_like(ratio, self.weight)


class AdaptiveUnlimited(GTWeight):
    def __init__(self, alpha: float = 0.25, beta: float = 0.2):
        self.alpha, self.beta = alpha, beta

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        return self.beta * ratio.clamp(min=0) ** self.alpha


class Adaptive(AdaptiveUnlimited):
    def __init__(self, alpha: float = 0.25, beta: float = 0.2, r_peak: float = 30.0, r_dead: float = 100.0):
        super().__init__(alpha, beta)
        if not 0 < r_peak < r_dead:
            raise ValueError(f"Adaptive needs 0 < r_peak < r_dead, got r_peak {r_peak}, r_dead {r_dead}")
        self.r_peak, self.r_dead = r_peak, r_dead

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        peak = self.beta * self.r_peak**self.alpha
        falling = peak * (self.r_dead - ratio) / (self.r_dead - self.r_peak)  # linear from the peak to 0 at R_d
        rising = super().__call__(ratio)
        return torch.where(ratio <= self.r_peak, rising, falling.clamp(min=0))
