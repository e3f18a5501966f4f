"""PeRFlowScheduler: the piecewise rectified flow step rule (SPEC section 3) as a diffusers scheduler.

The model output at timestep tau = T t_c - 1 (the DDPM index of t_c, the unit the teacher and the
student are trained in) is read as the window's `ddim_eps` (or, with
prediction_type "v_prediction", as v at abar_{n(t_c)}, converted to eps). The step estimates
the window end z_e from (z, eps) and moves along the straight line to the next timestep:
    z <- z + (t_next - t_c) (z_e_hat - z) / (t_e - t_c)
so given the true eps it lands exactly on the window end.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from . import perflow as P
from .schedule import v_to_eps

PREDICTION_TYPES = ("ddim_eps", "v_prediction")


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """K windows, `set_timesteps(n)` spreads n >= K steps over them (`perflow.inference_timesteps`),
    `step` is the window-end rule above. Works in any diffusers-style loop:

        scheduler.set_timesteps(6)                       # [999, 874, 749, 624, 499, 249]
        for t in scheduler.timesteps:
            z = scheduler.step(model(z, t), t, z).prev_sample
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", num_time_windows: int = 4, prediction_type: str = "ddim_eps"):
        # betas and their product in float32 exactly as diffusers' DDPM/DDIM schedulers make them, so a
        # student samples on the very schedule it was trained on; the step's arithmetic is float64
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise NotImplementedError(f"beta_schedule {beta_schedule!r}: PeRFlowScheduler has linear and scaled_linear")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).double()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        cfg = self.config
        steps = P.inference_timesteps(num_inference_steps, cfg.num_time_windows, cfg.num_train_timesteps)
        self.timesteps = torch.from_numpy(steps).to(device)
        self.num_inference_steps = num_inference_steps

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[P.time_to_index(t, self.config.num_train_timesteps)]

    def next_timestep(self, timestep) -> int:
        """The timestep after `timestep` in `self.timesteps`, -1 (t = 0, the data end) after the last."""
        later = (self.timesteps == int(timestep)).nonzero()
        if len(later) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
        i = int(later[0, 0]) + 1
        return int(self.timesteps[i]) if i < len(self.timesteps) else -1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        cfg = self.config
        t = torch.tensor(P.timestep_to_time(int(timestep), cfg.num_train_timesteps), dtype=torch.float64)
        t_next = P.timestep_to_time(self.next_timestep(timestep), cfg.num_train_timesteps)
        t_s, t_e = P.window_bounds(t, cfg.num_time_windows)
        lambda_s, eta_s = P.window_coefficients(self._abar(t_s), self._abar(t_e))
        eps = model_output
        if cfg.prediction_type == "v_prediction":
            eps = v_to_eps(sample, model_output, self._abar(t).to(sample.dtype))
        z_end = P.window_end_estimate(sample, eps, t, t_s, t_e, lambda_s, eta_s)
        prev = sample + float((t_next - t) / (t_e - t)) * (z_end - sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process at timesteps tau (DDPM indices): the window starts of Eq 2."""
        abar = self.alphas_cumprod[timesteps.cpu().long()].to(original_samples)
        abar = abar.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
