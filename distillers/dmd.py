"""DMD: distribution matching distillation to a few-step, one-pass student (TurboTalk stage 1; SPEC 3b,
after DMD2). Three networks of one size:

    G  the student (generator), from the teacher; its timesteps [999, 749, 499, 249] (4 steps)
    R  the frozen teacher, Eq 9 at the scales G is told (guided mode, fixed or drawn per clip)
    F  the fake score: a trainable copy of the teacher, conditional only, with its own AdamW

A training step draws the generator step k (the same for the batch; `sample_time` gives its time
t_k = (timestep_k + 1) / T), runs G for k steps without gradient from pure noise (backward
simulation), then one step with gradient to x. Under no_grad, x is noised to t ~ U{0.02T .. 0.98T}
and both scores denoise it; G descends dmd_loss(x, dmd_gradient(x, x0_real, x0_fake))
(fada_lightning/diffusion/dmd.py). F learns G's distribution by denoising fresh G samples (its own
parameterisation, t ~ U{0 .. T-1}) every step; G steps once every `two_time_scale` steps.
The student samples with `DMDScheduler`: 4 steps of one pass each, 4 NFE per clip window.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from fada_lightning.diffusion import dmd
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions
from fada_lightning.diffusion.scheduling_dmd import DMDScheduler

from .base import CFGDistiller, DistillTargets, Optimization


@dataclass
class DMDTargets(DistillTargets):
    """G's job: `z` the pure noise it starts from, `timestep` (B,) the generator timestep that gets the
    gradient (its step k), `cond` what G sees (with the scales in guided mode). No regression target
    (`eps_target` is None). `real_cond` and `scales` give R's Eq 9; `generator` the step's random draws."""

    real_cond: Conditions | None = None
    scales: tuple[torch.Tensor, torch.Tensor] | None = None
    generator: torch.Generator | None = None


class DMD(CFGDistiller):
    """generator_steps: G's steps (4); two_time_scale: G steps once every N steps, F every step (5;
    DMD2 used 10 for SD1.5); fake_lr, fake_betas, fake_grad_clip: F's AdamW (DMD2: 1e-5);
    dmd_range: where the scores compare G's samples, as fractions of T. The CFG-teacher arguments are
    `CFGDistiller`'s; DMD runs guided (R's Eq 9 is what G learns to make in one pass a step)."""

    def __init__(self, generator_steps: int = 4, two_time_scale: int = 5, fake_lr: float = 1e-5,
                 fake_betas: tuple[float, float] = (0.9, 0.999), fake_grad_clip: float | None = 10.0,
                 dmd_range: tuple[float, float] = (0.02, 0.98), mode: str = "guided", sample_steps: int = 4,
                 **kwargs):
        super().__init__(mode=mode, sample_steps=sample_steps, **kwargs)
        if mode != "guided":
            raise ValueError("DMD's real score is the teacher's Eq 9: mode must be guided (its student samples "
                             "with one pass a step)")
        if sample_steps != generator_steps:
            raise ValueError(f"DMD samples at the steps it trains: sample_steps {sample_steps} must equal "
                             f"generator_steps {generator_steps}")
        if two_time_scale < 1 or not 0 <= dmd_range[0] < dmd_range[1] <= 1:
            raise ValueError(f"DMD needs two_time_scale >= 1 and 0 <= low < high <= 1, got {two_time_scale}, {dmd_range}")
        self.generator_steps, self.dmd_range = generator_steps, tuple(dmd_range)
        self.student_every = two_time_scale
        self.fake = Optimization(lr=fake_lr, betas=tuple(fake_betas), grad_clip=fake_grad_clip)

    def build_networks(self, teacher):
        self.add_network("fake_score", copy.deepcopy(teacher), self.fake)

    # ---- time: the generator's steps ---------------------------------------------------------
    def generator_timesteps(self, device=None) -> torch.Tensor:
        return dmd.generator_timesteps(self.generator_steps, self.num_train_timesteps).to(device)

    def sample_time(self, batch_size: int, device, generator=None) -> torch.Tensor:
        """The time (n + 1) / T of the generator step that gets the gradient, one for the whole batch and
        the same on every rank (so every rank runs G as often: FSDP gathers in step)."""
        gen_device = generator.device if generator is not None else device
        k = torch.randint(0, self.generator_steps, (1,), generator=generator, device=gen_device).to(device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(k, src=0)
        return ((self.generator_timesteps(device)[k] + 1) / self.num_train_timesteps).expand(batch_size)

    def steps_before(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) the generator step k of each timestep."""
        return (timestep.long()[:, None] == self.generator_timesteps(timestep.device)).float().argmax(1)

    # ---- the job -------------------------------------------------------------------------------
    def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None) -> DMDTargets:
        student_cond, _ = self.guided_teacher(teacher, cond, generator)  # draws the scales (guided mode)
        timestep = (t * self.num_train_timesteps - 1).round()
        return DMDTargets(z=eps, timestep=timestep, cond=student_cond, eps_target=None,
                          abar=self.alphas_cumprod[timestep.long()], weight=torch.ones_like(t), real_cond=cond,
                          scales=(student_cond.guidance[:, 0], student_cond.guidance[:, 1]), generator=generator)

    def _randn(self, like: torch.Tensor, generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=generator.device if generator else like.device).to(like)

    def generator_x0(self, student, z: torch.Tensor, timestep: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """G's one step: its output at `timestep` (B,) read as x0."""
        abar = self.abar(timestep.long(), z)
        return S.eps_to_x0(z, S.to_eps(student(z, timestep, cond), z, abar, self.prediction_type), abar)

    def generator_input(self, student, job: DMDTargets) -> torch.Tensor:
        """Backward simulation (under no_grad): each clip's input at its step k, from pure noise."""
        k = self.steps_before(job.timestep)
        timesteps, x = self.generator_timesteps(job.z.device), job.z
        with torch.no_grad():
            for i in range(int(k.max())):
                n = timesteps[i].expand(len(x)).float()
                x0 = self.generator_x0(student, x, n, job.cond)
                renoised = S.add_noise(x0, self._randn(x0, job.generator), self.abar(timesteps[i + 1].expand(len(x)), x0))
                x = torch.where((i < k).view(-1, *[1] * (x.ndim - 1)), renoised, x)  # clips past their k keep their input
        return x

    def sample(self, student, job: DMDTargets) -> torch.Tensor:
        """A G sample x (x0 at each clip's step k), without gradient."""
        with torch.no_grad():
            return self.generator_x0(student, self.generator_input(student, job), job.timestep, job.cond)

    # ---- the losses ----------------------------------------------------------------------------
    def student_loss(self, student, job: DMDTargets):
        """The DMD loss of G's one step with gradient (its value means little: watch the gradient norm)."""
        x = self.generator_x0(student, self.generator_input(student, job), job.timestep, job.cond)
        with torch.no_grad():
            t = dmd.dmd_timesteps(len(x), self.num_train_timesteps, *self.dmd_range, job.generator, x.device)
            x_t = S.add_noise(x.detach(), self._randn(x, job.generator), self.abar(t, x))
            x0_real = self.x0_of(self.eps_fn(self.teacher, job.real_cond, *job.scales), x_t, t)
            x0_fake = self.x0_of(self.eps_fn(self.networks["fake_score"], job.real_cond), x_t, t)
            grad = dmd.dmd_gradient(x.detach(), x0_real, x0_fake)
        logs = {"dmd/x0_gap": (x0_fake - x0_real).abs().flatten(1).mean(1)}
        return dmd.dmd_loss(x, grad), logs

    def x0_of(self, eps_fn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t, x_t)
        return S.eps_to_x0(x_t, eps_fn(x_t, t), abar)

    def network_loss(self, name, student, job: DMDTargets):
        """F's denoising loss on a fresh G sample, in the network's own parameterisation."""
        x = self.sample(student, job)
        t = torch.randint(0, self.num_train_timesteps, (len(x),), generator=job.generator,
                          device=job.generator.device if job.generator else x.device).to(x.device)
        eps = self._randn(x, job.generator)
        abar = self.abar(t, x)
        x_t = S.add_noise(x, eps, abar)
        cond = replace(job.cond, guidance=None)  # F is the teacher's copy: conditional, told no scales
        pred = self.networks[name](x_t, t, cond)
        return (pred.float() - S.from_eps(eps, x_t, abar, self.prediction_type)).pow(2).mean(), {}

    def scheduler(self) -> DMDScheduler:
        return DMDScheduler(**self.schedule_config, prediction_type=self.prediction_type)
