"""Noise schedule and parameterisation math: small pure functions on tensors.

Notation (SPEC section 3): T = 1000 DDPM steps, abar_n = alphas_cumprod[n],
z_n = sqrt(abar_n) z0 + sqrt(1 - abar_n) eps                           (Eq 1)
v   = sqrt(abar_n) eps - sqrt(1 - abar_n) z0                            (v-prediction)

`abar` arguments are already gathered per sample and broadcast to the tensor
they multiply (see `expand_like`).
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler

# SD1.5's training schedule, pinned: the lineage trained with `scaled_linear` and
# has sampled with `linear` by mistake, so nobody relies on library defaults.
SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)

PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod(schedule: dict | None = None) -> torch.Tensor:
    """abar_n for n = 0..T-1, float64 (T,), from the same code diffusers samples with."""
    return DDIMScheduler(**(schedule or SD15_SCHEDULE)).alphas_cumprod.double()


def ddim_scheduler(prediction_type: str = "epsilon", schedule: dict | None = None) -> DDIMScheduler:
    check_prediction_type(prediction_type)
    return DDIMScheduler(**(schedule or SD15_SCHEDULE), prediction_type=prediction_type)


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def expand_like(per_sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with x's rank and dtype, for broadcasting over x (B, ...)."""
    return per_sample.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(z0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Eq 1 forward process: z_n = sqrt(abar) z0 + sqrt(1-abar) eps."""
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


def eps_to_x0(z: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (z - (1 - abar).sqrt() * eps) / abar.sqrt()


def x0_to_eps(z: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (z - abar.sqrt() * x0) / (1 - abar).sqrt()


def v_target(z0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1-abar) z0."""
    return abar.sqrt() * eps - (1 - abar).sqrt() * z0


def v_to_eps(z: torch.Tensor, v: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1-abar) z + sqrt(abar) v  (since z = sqrt(abar) z0 + sqrt(1-abar) eps)."""
    return (1 - abar).sqrt() * z + abar.sqrt() * v


def eps_to_v(z: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v = (eps - sqrt(1-abar) z) / sqrt(abar)."""
    return (eps - (1 - abar).sqrt() * z) / abar.sqrt()


def to_eps(prediction: torch.Tensor, z: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A network output of either parameterisation, expressed as eps."""
    if check_prediction_type(prediction_type) == "epsilon":
        return prediction
    return v_to_eps(z, prediction, abar)


def from_eps(eps: torch.Tensor, z: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """An eps-space target expressed in the network's own parameterisation."""
    if check_prediction_type(prediction_type) == "epsilon":
        return eps
    return eps_to_v(z, eps, abar)


def snr(abar: torch.Tensor) -> torch.Tensor:
    return abar / (1 - abar)


def min_snr_weight(abar: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a loss in the network's own space.

    In x0 space the weight is min(snr, gamma); an eps loss is snr times an x0 loss
    and a v loss is (snr + 1) times one, so divide by that. gamma=None -> 1.
    """
    if gamma is None:
        return torch.ones_like(abar)
    s = snr(abar)
    clipped = s.clamp(max=gamma)
    if check_prediction_type(prediction_type) == "epsilon":
        return clipped / s
    return clipped / (s + 1)


def ddim_coefficients(abar_from: torch.Tensor, abar_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A DDIM jump (eta = 0) is affine in (z, eps): z_to = lam z + eta eps with
    lam = sqrt(abar_to / abar_from), eta = sqrt(1 - abar_to) - sqrt(abar_to (1 - abar_from) / abar_from)."""
    lam = (abar_to / abar_from) ** 0.5
    eta = (1 - abar_to) ** 0.5 - (abar_to * (1 - abar_from) / abar_from) ** 0.5
    return lam, eta


def ddim_step(z: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from noise level abar_from to abar_to with the same eps:
    z_to = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps, x0_hat = eps_to_x0(z, eps, abar_from)."""
    return add_noise(eps_to_x0(z, eps, abar_from), eps, abar_to)
