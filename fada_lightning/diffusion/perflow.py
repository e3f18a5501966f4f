"""PeRFlow windows, targets and step rule (SPEC section 3, Eq 2-5): small pure functions.

Time t in [0, 1] (1 = noise, 0 = data) is cut into K equal windows with boundaries k/K; t
belongs to the window (t_e, t_s]. A time maps to the DDPM index n(t) = max(round(T t) - 1, 0),
so t_s = 1 is index 999 and t_e = 0 is index 0 (SD1.5's set_alpha_to_one=False: the chain
ends at abar_0, as the official PeRFlow code does). The student's timestep is in the teacher's
unit, the DDPM index: tau(t) = T t - 1 (continuous between grid points, 999 at t = 1). Arguments are tensors broadcast to each
other; per-sample values (B,) are expanded over a latent (B, ...) with `expand_like`.
"""
from __future__ import annotations

import numpy as np
import torch

from .schedule import ddim_coefficients, expand_like

# t on the 1/T grid is at least 1/T from any window boundary that it is not on, so a small
# tolerance makes boundary lookups exact without mis-assigning interior points.
_BOUNDARY_TOL = 1e-4


def time_to_index(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """n(t) = max(round(T t) - 1, 0): the DDPM index whose noise level time t stands for."""
    return (torch.round(t * num_train_timesteps) - 1).clamp(min=0).long()


def time_to_timestep(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """tau(t) = T t - 1, the timestep (DDPM index units, float) the student sees at time t."""
    return t * num_train_timesteps - 1


def timestep_to_time(tau, num_train_timesteps: int = 1000):
    """t(tau) = (tau + 1) / T, the inverse of `time_to_timestep`."""
    return (tau + 1) / num_train_timesteps


def window_bounds(t: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_s, t_e) of the window (t_e, t_s] holding t; a boundary belongs to the window it starts."""
    k = torch.ceil(t * num_windows - _BOUNDARY_TOL).clamp(min=1)  # window number from the data side, 1..K
    return k / num_windows, (k - 1) / num_windows


def window_coefficients(abar_s: torch.Tensor, abar_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 5: z_e = lambda_s z_s + eta_s eps for a DDIM jump s -> e with noise eps:
    lambda_s = sqrt(abar_e / abar_s), eta_s = sqrt(1 - abar_e) - sqrt(abar_e (1 - abar_s) / abar_s)."""
    return ddim_coefficients(abar_s, abar_e)


def interpolate(z_s: torch.Tensor, z_e: torch.Tensor, t, t_s, t_e) -> torch.Tensor:
    """Eq 3, the student's input: z_t = z_s + (t - t_s) / (t_e - t_s) (z_e - z_s)."""
    return z_s + expand_like((t - t_s) / (t_e - t_s), z_s) * (z_e - z_s)


def ddim_eps_target(z_s: torch.Tensor, z_e: torch.Tensor, lambda_s, eta_s) -> torch.Tensor:
    """Eq 4 (`ddim_eps`): the eps that makes z_s -> z_e one DDIM jump: (z_e - lambda_s z_s) / eta_s."""
    return (z_e - expand_like(lambda_s, z_s) * z_s) / expand_like(eta_s, z_s)


def window_end_estimate(z: torch.Tensor, eps: torch.Tensor, t, t_s, t_e, lambda_s, eta_s) -> torch.Tensor:
    """Eq 3 and 4 solved for z_e given z_t and eps (the scheduler's step rule):
    D = lambda_s (t - t_s) + (t_e - t); z_e = [lambda_s (t_e - t_s) z + eta_s (t_e - t) eps] / D."""
    d = lambda_s * (t - t_s) + (t_e - t)
    lambda_t, eta_t = lambda_s * (t_e - t_s) / d, eta_s * (t_e - t) / d
    return expand_like(lambda_t, z) * z + expand_like(eta_t, z) * eps


def solver_indices(t_s: torch.Tensor, t_e: torch.Tensor, steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(B,) window bounds -> (B, steps + 1) DDPM indices of an even N-step teacher solve t_s -> t_e."""
    fraction = torch.arange(steps + 1, device=t_s.device, dtype=t_s.dtype) / steps
    times = t_s[:, None] + (t_e - t_s)[:, None] * fraction
    return time_to_index(times, num_train_timesteps)


def inference_timesteps(num_steps: int, num_windows: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The timesteps (DDPM indices T t - 1) of an n-step sampler: steps per window (from noise)
    floor(n/K) + 1 for the first n mod K windows, else floor(n/K); even in time in each window:
    n = 6, K = 4 -> t = [1, 0.875, 0.75, 0.625, 0.5, 0.25] -> [999, 874, 749, 624, 499, 249]."""
    if num_steps < num_windows:
        raise ValueError(f"PeRFlow takes at least one step per window: {num_steps} steps < {num_windows} windows")
    times = []
    for i in range(num_windows):
        count = num_steps // num_windows + (1 if i < num_steps % num_windows else 0)
        t_s, t_e = 1 - i / num_windows, 1 - (i + 1) / num_windows
        times.append(np.linspace(t_s, t_e, count, endpoint=False))
    return np.round(np.concatenate(times) * num_train_timesteps).astype(np.int64) - 1
