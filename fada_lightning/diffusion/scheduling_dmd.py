"""DMDScheduler: the few-step sampler a DMD generator is trained for (SPEC 3b), as a diffusers scheduler.

`set_timesteps(n)` gives the generator's n timesteps ([999, 749, 499, 249] for 4); `step` reads the
model output as x0 (from eps or v at that timestep) and re-noises it with fresh noise to the next
timestep, or returns x0 after the last: the very chain backward simulation runs in training.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from . import dmd
from . import schedule as S


class DMDScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon"):
        schedule = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                        beta_schedule=beta_schedule)
        self.alphas_cumprod = S.alphas_cumprod(schedule).float()  # the float32 values training uses
        S.check_prediction_type(prediction_type)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = dmd.generator_timesteps(1, num_train_timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        self.timesteps = dmd.generator_timesteps(num_inference_steps, self.config.num_train_timesteps).to(device)
        self.num_inference_steps = num_inference_steps

    def x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[int(timestep)].to(sample)
        eps = S.to_eps(model_output, sample, abar, self.config.prediction_type)
        return S.eps_to_x0(sample, eps, abar)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        x0 = self.x0(model_output, timestep, sample)
        later = (self.timesteps == int(timestep)).nonzero()
        if len(later) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
        i = int(later[0, 0]) + 1
        if i == len(self.timesteps):
            prev = x0
        else:
            eps = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device)
            prev = S.add_noise(x0, eps.to(x0), self.alphas_cumprod[int(self.timesteps[i])].to(x0))
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
