"""Distribution matching distillation (DMD2, TurboTalk stage 1; SPEC section 3b): pure functions.

The generator G makes x (B, ...) in a few steps; the real score R (the frozen teacher, Eq 9) and
the fake score F (a copy trained on G's samples) each denoise x_t = add_noise(x, eps, t) to x0.
The distribution-matching gradient and its normaliser, per sample and in float32:

    grad = (x0_fake - x0_real) / mean_{F,C,h,w} |x - x0_real|          (NaN and inf -> 0)
    L_G  = 0.5 mean (x - stopgrad(x - grad))^2,   so  dL_G/dx = grad / numel

Descending L_G moves each sample towards where the real score points and away from where the fake
one does. Backward simulation gives G the inputs it meets when sampling: from pure noise at the
first generator timestep, k steps of G without gradient, each x0 re-noised with fresh noise to the
next timestep.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .schedule import add_noise, expand_like


def generator_timesteps(num_steps: int = 4, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The generator's timesteps, evenly spaced from pure noise: 4 of 1000 -> [999, 749, 499, 249]."""
    return num_train_timesteps - 1 - torch.arange(num_steps) * (num_train_timesteps // num_steps)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """(x0_fake - x0_real) / mean |x - x0_real| per sample, in float32, NaN and inf set to 0."""
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    normaliser = (x - x0_real).abs().flatten(1).mean(1)
    return torch.nan_to_num((x0_fake - x0_real) / expand_like(normaliser, x), nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 mean (x - stopgrad(x - grad))^2: a scalar whose gradient w.r.t. x is grad / numel (its value
    is 0.5 mean grad^2 and says nothing about progress: log the gradient's norm instead)."""
    x = x.float()
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def dmd_timesteps(batch_size: int, num_train_timesteps: int = 1000, low: float = 0.02, high: float = 0.98,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B,) DDPM indices uniform on {low T, ..., high T}: where the two scores compare G's samples."""
    first, last = int(low * num_train_timesteps), int(high * num_train_timesteps)
    gen_device = generator.device if generator is not None else device
    return torch.randint(first, last + 1, (batch_size,), generator=generator, device=gen_device).to(device)


def backward_simulation(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                        timesteps: torch.Tensor, steps: torch.Tensor, alphas_cumprod: torch.Tensor,
                        renoise: torch.Tensor, passes: int | None = None) -> torch.Tensor:
    """G's input after steps[b] of its own sampling, per clip (call it under no_grad).

    noise (B, ...) is x at timesteps[0]; renoise (B, S, ...) the fresh eps of each re-noising. Pass i
    runs the whole batch: x0 = denoise(x, timesteps[i] (B,)) and, for the clips with steps > i,
    x = add_noise(x0, renoise[:, i], alphas_cumprod[timesteps[i + 1]]). `passes` (default max(steps))
    may be more, so every rank of a sharded model runs as many passes: extra passes change nothing."""
    x = noise
    passes = int(steps.max()) if passes is None else passes
    for i in range(passes):
        x0 = denoise(x, timesteps[i].expand(len(x)))
        renoised = add_noise(x0, renoise[:, i].to(x0), alphas_cumprod[timesteps[i + 1]].to(x0))
        x = torch.where((steps > i).reshape(-1, *[1] * (x.ndim - 1)), renoised, x)
    return x
