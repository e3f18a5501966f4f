"""PeRFlow: piecewise rectified flow distillation (SPEC section 3, Eq 2-5; after the official code).

For t in window (t_e, t_s]: z_s = add_noise(z0, eps, n(t_s)); the frozen teacher solves DDIM for
`solver_steps` steps t_s -> t_e giving z_e; the student sees z_t on the straight line z_s -> z_e at
timestep T t - 1 (DDPM index units) and learns eps_target = (z_e - lambda_s z_s) / eta_s.
`mode` balanced (the student keeps Eq 9 at inference, 18 NFE at 6 steps) or guided (one pass a
step), with the rest of the CFG-teacher arguments, are `CFGDistiller`'s.
min_snr_gamma weights the eps loss by min(snr_t, gamma) / snr_t (the min-SNR weighting of the
teacher, read in eps space); None is SPEC's plain ||eps_theta - eps_target||^2.
"""
from __future__ import annotations

import torch

from fada_lightning.diffusion import perflow as P
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.scheduling_perflow import PeRFlowScheduler

from .base import CFGDistiller, DistillTargets


class PeRFlow(CFGDistiller):
    fixed_targets = True  # a validation's teacher solves (most of its time) are made once per batch

    def __init__(self, num_windows: int = 4, solver_steps: int = 8, min_snr_gamma: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if self.sample_steps < num_windows:
            raise ValueError(f"sample_steps {self.sample_steps} < num_windows {num_windows}: PeRFlow takes a step per window")
        self.num_windows, self.solver_steps, self.min_snr_gamma = num_windows, solver_steps, min_snr_gamma

    def solve(self, teacher_eps, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Eq 3's Phi: DDIM along indices (B, N + 1), one teacher call a step."""
        for n, n_next in zip(indices.unbind(1)[:-1], indices.unbind(1)[1:]):
            z = S.ddim_step(z, teacher_eps(z, n), self.abar(n, z), self.abar(n_next, z))
        return z

    def window(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(t_s, t_e, n_s, n_e): the window (t_e, t_s] holding each t (B,) and its DDPM indices."""
        t_s, t_e = P.window_bounds(t, self.num_windows)
        T = self.num_train_timesteps
        return t_s, t_e, P.time_to_index(t_s, T), P.time_to_index(t_e, T)

    def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None) -> DistillTargets:
        t_s, t_e, n_s, n_e = self.window(t)
        z_s = S.add_noise(z0, eps, self.abar(n_s, z0))  # Eq 2: the window start on the marginal
        cond, teacher_eps = self.guided_teacher(teacher, cond, generator)
        z_e = self.solve(teacher_eps, z_s, P.solver_indices(t_s, t_e, self.solver_steps, self.num_train_timesteps))
        return self.segment_targets(z_s, z_e, t, cond)

    def segment_targets(self, z_s: torch.Tensor, z_e: torch.Tensor, t: torch.Tensor, cond) -> DistillTargets:
        """The student's input on the straight segment z_s -> z_e of t's window and its eps target."""
        t_s, t_e, n_s, n_e = self.window(t)
        lambda_s, eta_s = P.window_coefficients(self.alphas_cumprod[n_s], self.alphas_cumprod[n_e])
        abar_t = self.alphas_cumprod[P.time_to_index(t, self.num_train_timesteps)]
        return DistillTargets(
            z=P.interpolate(z_s, z_e, t, t_s, t_e),  # Eq 3
            timestep=P.time_to_timestep(t, self.num_train_timesteps),
            cond=cond,
            eps_target=P.ddim_eps_target(z_s, z_e, lambda_s, eta_s),  # Eq 4
            abar=abar_t,
            weight=S.min_snr_weight(abar_t, self.min_snr_gamma, "epsilon"),  # 1 without a gamma
        )

    def scheduler(self) -> PeRFlowScheduler:
        return PeRFlowScheduler(num_time_windows=self.num_windows,
                                prediction_type="ddim_eps" if self.prediction_type == "epsilon" else "v_prediction",
                                **self.schedule_config)
