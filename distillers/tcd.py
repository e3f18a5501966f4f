"""TCD: trajectory consistency distillation (SPEC section 3; Zheng et al. 2024, after LCM's recipe).

On the solver grid (`grid_steps` = 50 points of diffusers' TCDScheduler) take t = t_{n+k}, and
t_n = t - skip (k = 20 DDPM steps, one grid step). With z = add_noise(z0, eps, t):
    z_prev = one teacher DDIM step t -> t_n (Eq 9 at the given scales in `guided` mode)
    s      ~ uniform on {0, ..., t_n}
    target = f_ema(z_prev, t_n, s)          the student's EMA network's consistency function
    loss   = d(f_theta(z, t, s), target)    d = L2 or pseudo-Huber sqrt(x^2 + c^2) - c, per element
f is a DDIM jump with the network's eps (`fada_lightning.diffusion.tcd`), so f_theta(z, t, s) =
lam z + eta eps_theta with (lam, eta) = ddim_coefficients(abar_t, abar_s): the target is handed
to the loop in eps space, eps_target = (target - lam z) / eta, with `scale` = eta to measure d
where f lives. The student samples with diffusers' TCDScheduler, gamma = `gamma` (its `eta`).
`mode` guided (SPEC's default: the teacher's step is guided, the student samples with one pass)
or balanced (the teacher's step is unguided on dropped conditions, the student samples with
Eq 9: 18 NFE at 6 steps, the setting of FADA's distiller table); it and the other CFG-teacher
arguments (scales, scale ranges in guided mode, dropout) are `CFGDistiller`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers import TCDScheduler

from fada_lightning.diffusion import perflow as P
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion import tcd
from fada_lightning.presets import ConfigError

from .base import CFGDistiller, DistillTargets

DISTANCES = ("l2", "huber")


@dataclass
class ConsistencyTargets(DistillTargets):
    scale: torch.Tensor  # (B,) eta of f(z, t, s) = lam z + eta eps: an eps error times it is an error in f
    end: torch.Tensor  # (B,) s, the DDPM index f jumps to


class TCD(CFGDistiller):
    SOLUTIONS_KEPT = 64  # held-out batches whose teacher solution is kept (budgets/plateau.yaml validates 8)

    def __init__(self, grid_steps: int = 50, skip: int = 20, distance: str = "l2", huber_c: float = 0.001,
                 gamma: float = 0.3, mode: str = "guided", **kwargs):
        super().__init__(mode=mode, **kwargs)
        if distance not in DISTANCES:
            raise ValueError(f"TCD distance must be one of {DISTANCES}, got {distance!r}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"TCD gamma must be in [0, 1], got {gamma}")
        if skip < 1 or self.sample_steps > grid_steps:
            raise ValueError(f"TCD needs skip >= 1 and sample_steps <= grid_steps, got skip {skip}, "
                             f"sample_steps {self.sample_steps}, grid_steps {grid_steps}")
        self.grid_steps, self.skip, self.distance, self.huber_c = grid_steps, skip, distance, huber_c
        self.sample_eta = gamma
        self._solutions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (z, end, solution)

    def bind(self, schedule: dict, prediction_type: str, student_ema=None) -> None:
        if student_ema is None:
            raise ConfigError("TCD's target network is the student's EMA: set model.init_args.ema_decay "
                              "(distill_tcd.yaml uses 0.95)")
        super().bind(schedule, prediction_type, student_ema)

    def set_teacher(self, teacher, student=None) -> None:
        super().set_teacher(teacher, student)
        self._solutions = []  # solved by another teacher

    def sample_time(self, batch_size: int, device, generator=None) -> torch.Tensor:
        """t_{n+k} uniform on the solver grid, as a time: (n + 1) / T."""
        gen_device = generator.device if generator is not None else device
        i = torch.randint(0, self.grid_steps, (batch_size,), generator=generator, device=gen_device).to(device)
        return (tcd.solver_grid(self.grid_steps, self.num_train_timesteps, device)[i] + 1) / self.num_train_timesteps

    def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None) -> ConsistencyTargets:
        n = P.time_to_index(t, self.num_train_timesteps).clamp(min=1)  # t_{n+k}
        n_prev = (n - self.skip).clamp(min=0)  # t_n
        n_s = tcd.sample_end_index(n_prev, generator)  # s
        abar = self.alphas_cumprod
        z = S.add_noise(z0, eps, self.abar(n, z0))
        cond, teacher_eps = self.guided_teacher(teacher, cond, generator)
        z_prev = S.ddim_step(z, teacher_eps(z, n), self.abar(n, z), self.abar(n_prev, z))  # one teacher step
        ema_eps = self.eps_fn(self.student_ema, cond)(z_prev, n_prev)
        target = tcd.consistency_function(z_prev, ema_eps, self.abar(n_prev, z), self.abar(n_s, z))
        lam, eta = S.ddim_coefficients(abar[n], abar[n_s])  # f_theta(z, t, s) = lam z + eta eps_theta
        return ConsistencyTargets(
            z=z, timestep=n.to(z.dtype), cond=cond,
            eps_target=(target - S.expand_like(lam, z) * z) / S.expand_like(eta, z),
            abar=abar[n], weight=torch.ones_like(t), scale=eta, end=n_s,
        )

    def held_out_loss(self, student, job: ConsistencyTargets) -> torch.Tensor:
        """The training loss with a target that stays put: the teacher's own DDIM solution from z at t to s
        (`tcd.teacher_solution`, steps of `skip`) instead of the EMA's jump, which moves with the student
        (against it the loss is noise from the first step). 0 for the teacher's exact consistency function."""
        n = job.timestep.long()
        solution = next((x for z, end, x in self._solutions if torch.equal(z, job.z) and torch.equal(end, job.end)), None)
        if solution is None:  # the teacher is frozen and validation's draws fixed: solve each batch once
            solution = tcd.teacher_solution(job.z, self.teacher_eps(job.cond), n, job.end, self.skip, self.alphas_cumprod)
            self._solutions = [*self._solutions[-(self.SOLUTIONS_KEPT - 1):], (job.z, job.end, solution)]
        lam, eta = S.ddim_coefficients(self.alphas_cumprod[n], self.alphas_cumprod[job.end])
        fixed = replace(job, eps_target=(solution - S.expand_like(lam, job.z) * job.z) / S.expand_like(eta, job.z))
        return self.student_loss(student, fixed)[0]

    def loss(self, pred: torch.Tensor, job: ConsistencyTargets) -> tuple[torch.Tensor, dict]:
        """mean_B weight * mean d(f_theta - target), measured on f = lam z + scale eps."""
        error = S.expand_like(job.scale, job.z) * (self.to_eps(pred.float(), job.z, job.abar) - job.eps_target)
        if self.distance == "l2":
            per_element = error.pow(2)
        else:
            per_element = (error.pow(2) + self.huber_c**2).sqrt() - self.huber_c
        return (job.weight * per_element.flatten(1).mean(1)).mean(), {}

    def scheduler(self) -> TCDScheduler:
        return TCDScheduler(**self.schedule_config, original_inference_steps=self.grid_steps,
                            prediction_type=self.prediction_type)
