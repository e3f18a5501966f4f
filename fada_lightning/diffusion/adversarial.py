"""Adversarial distillation from a few steps to one (TurboTalk stage 2; SPEC section 3b): pure functions.

A discriminator D gives logits (B, H), one per head; each head is its own non-saturating GAN
(losses averaged over heads):

    L_D = mean softplus(D(fake)) + mean softplus(-D(real))       (2 ln 2 when D says 0)
    L_G = mean softplus(-D(G's x))                               (ln 2 when D says 0)
    R1 ~ mean (D(x) - D(x + sigma eps))^2                        (approximate R1: no double backward)

Both sides reach D re-noised to the same t-hat with the same eps, t-hat drawn toward high noise
(logit-normal). The step G trains from follows a schedule over the generator's timesteps; its input
at a later step comes from the frozen few-step reference's own chain (`sampling_chain`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .schedule import add_noise


def weighted_sum(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(N, ...) -> sum_n weight_n mean(values_n); weight None: 1 / N each (the plain mean)."""
    per_row = values.float().flatten(1).mean(1) if values.ndim > 1 else values.float()
    return per_row.mean() if weight is None else (weight * per_row).sum()


def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor,
                       real_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H) and (N, H) logits -> mean softplus(D(fake)) + mean softplus(-D(real)), over rows and heads;
    real rows weighted by real_weight (N,) summing to 1 (default 1 / N), e.g. several positive sides."""
    return F.softplus(fake_logits.float()).mean() + weighted_sum(F.softplus(-real_logits.float()), real_weight)


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """(B, H) logits of G's samples -> mean softplus(-D(G's x)), over rows and heads."""
    return F.softplus(-fake_logits.float()).mean()


def approximate_r1(logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """(B, H) logits of D's real inputs and of the same inputs plus small noise -> (B,) mean over heads of
    (D(x) - D(x + sigma eps))^2: a finite-difference stand-in for sigma^2 ||grad_x D||^2, 0 where D is flat."""
    return (logits.float() - perturbed_logits.float()).pow(2).mean(1)


def noise_level_timesteps(batch_size: int, num_train_timesteps: int = 1000, loc: float = 1.0, scale: float = 1.0,
                          generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B,) DDPM indices T sigmoid(N(loc, scale^2)), rounded to {0 .. T - 1}: where D compares the two sides
    (loc > 0 favours high noise, as LADD's discriminator timesteps do)."""
    gen_device = generator.device if generator is not None else device
    u = torch.sigmoid(loc + scale * torch.randn(batch_size, generator=generator, device=gen_device))
    return (u * num_train_timesteps - 0.5).round().clamp(0, num_train_timesteps - 1).long().to(device)


def sampling_chain(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                   timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                   renoise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A few-step generator's whole chain (call it under no_grad): from x = noise at timesteps[0], each step
    x0 = denoise(x, timesteps[i] (B,)) re-noised with renoise[:, i] (B, S - 1, ...) to timesteps[i + 1].
    -> (inputs (B, S, ...): x at each of the S timesteps, the chain's final x0 (B, ...))."""
    x, inputs = noise, []
    for i in range(len(timesteps)):
        inputs.append(x)
        x0 = denoise(x, timesteps[i].expand(len(x)))
        if i + 1 < len(timesteps):
            x = add_noise(x0, renoise[:, i].to(x0), alphas_cumprod[timesteps[i + 1]].to(x0))
    return torch.stack(inputs, 1), x0
