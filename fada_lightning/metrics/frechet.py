"""The Frechet distance between Gaussians fitted to two feature sets: FID, FVD and E-FID alike.

d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr (S_1 S_2)^(1/2)    (Heusel et al. 2017)
"""
from __future__ import annotations

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features (N, D) -> mean (D,), unbiased covariance (D, D), both float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """d^2 above. S_1 S_2 is similar to S_1^(1/2) S_2 S_1^(1/2) (symmetric PSD), so its eigenvalues are
    real and >= 0 up to rounding: tr (S_1 S_2)^(1/2) = sum sqrt(eig(S_1 S_2)), which needs no matrix root."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace)


def frechet_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features a (N, D) and b (M, D)."""
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"feature sets differ in width: {tuple(a.shape)} vs {tuple(b.shape)}")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
