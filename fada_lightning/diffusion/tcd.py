"""Trajectory consistency distillation math (SPEC section 3, after Zheng et al. 2024): pure functions.

DDPM indices n in {0, ..., T-1}. The solver grid has `grid_steps` points k (1..N) - 1 with
k = T // N (N = 50: 19, 39, ..., 999), the timesteps diffusers' TCDScheduler samples on. The
consistency function is TCD's exponential-integrator step, which for eps-networks is exactly a
DDIM jump t -> s:
    f(x_t, t, s) = alpha_s x0_hat + sigma_s eps_hat,   x0_hat = (x_t - sigma_t eps_hat) / alpha_t
with alpha = sqrt(abar), sigma = sqrt(1 - abar); s = t is the identity.
"""
from __future__ import annotations

import torch

from .schedule import ddim_step, expand_like


def solver_grid(grid_steps: int, num_train_timesteps: int = 1000, device=None) -> torch.Tensor:
    """(N,) DDPM indices k (1..N) - 1, k = T // N: the training grid of TCDScheduler(original_inference_steps=N)."""
    k = num_train_timesteps // grid_steps
    return torch.arange(1, grid_steps + 1, device=device) * k - 1


def consistency_function(z_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor,
                         abar_s: torch.Tensor) -> torch.Tensor:
    """f(x_t, t, s): the DDIM jump t -> s with the network's eps (abar_* broadcast to z_t)."""
    return ddim_step(z_t, eps, abar_t, abar_s)


def sample_end_index(n_to: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """s uniform on {0, 1, ..., n_to} per sample: (B,) -> (B,) DDPM indices."""
    u = torch.rand(n_to.shape, generator=generator, device=generator.device if generator is not None else n_to.device)
    return torch.floor(u.to(n_to.device) * (n_to + 1)).long().clamp(max=n_to)


def teacher_solution(z: torch.Tensor, eps_of, n: torch.Tensor, n_end: torch.Tensor, skip: int,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The teacher's DDIM solution from z (B, ...) at indices n (B,) to n_end (B,) <= n: steps of `skip`
    indices, the last one shorter so each sample lands on its own end, which f(z, n, n_end) learns.
    eps_of(z, n) -> eps; a sample already at its end is left as it is."""
    at = n.clone()
    while (moving := at > n_end).any():
        to = torch.maximum(at - skip, n_end)
        stepped = ddim_step(z, eps_of(z, at), expand_like(alphas_cumprod[at], z), expand_like(alphas_cumprod[to], z))
        z = torch.where(moving.reshape(-1, *[1] * (z.ndim - 1)), stepped, z)
        at = to
    return z
