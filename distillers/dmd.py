"""DMD: distribution matching distillation to a few-step, one-pass student (TurboTalk stage 1; SPEC 3b,
after DMD2). Three networks of one size:

    G  the student (generator), from the teacher; its timesteps [999, 749, 499, 249] (4 steps)
    R  the frozen teacher, Eq 9 at the scales G is told (guided mode, fixed or drawn per clip)
    F  the fake score: a trainable copy of the teacher, conditional only, with its own AdamW

A training step draws the generator step k (one for the batch; `sample_time` gives its time
t_k = (timestep_k + 1) / T), runs G for k steps without gradient from pure noise (backward
simulation), then one step with gradient to x. Under no_grad, x is noised to t ~ U{0.02T .. 0.98T}
and both scores denoise it; G descends dmd_loss(x, dmd_gradient(x, x0_real, x0_fake))
(fada_lightning/diffusion/dmd.py). F learns G's distribution by denoising fresh G samples (its own
parameterisation, t ~ U{0 .. T-1}) every step; G steps once every `two_time_scale` steps.
The conditions are dropped as in teacher training (CFGDistiller's rates), the same for G, R and F.

Every random draw of a step (k, scales, dropout, the re-noising eps of backward simulation, both
comparison t and eps) is made in `make_targets` and kept in the job, one row per clip: the losses
are deterministic functions of the job, so a step is the same on 1 or P processes (tests/
test_distributed.py). Ranks may draw different k; every rank runs the largest k's passes (FSDP
gathers in step), clips past their own k keep their input.

Optional GAN head (DMD2; `gan_gen_weight` > 0): a small head on F's denoising mid-block features
-> one logit per clip, part of F (trained with F's loss, weight `gan_head_weight`, on F's noised G
samples against noised real clips of the strict tier, softplus losses); G adds
`gan_gen_weight` softplus(-D(x noised)).
The student samples with `DMDScheduler`: 4 steps of one pass each, 4 NFE per clip window.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F_
from torch import nn

from fada_lightning.diffusion import dmd
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions, condition_dropout
from fada_lightning.diffusion.scheduling_dmd import DMDScheduler

from .base import CFGDistiller, DistillTargets, Optimization


@dataclass
class DMDTargets(DistillTargets):
    """G's job, one row per clip: `z` the pure noise G starts from, `timestep` the generator timestep
    that gets the gradient (its step k), `cond` what G sees (dropped; with the scales in guided mode),
    `real_cond` the same conditions without scales (R's Eq 9 at cond's scales, and F), no regression
    target (`eps_target` None). The rest are the step's random draws (module docstring)."""

    real_cond: Conditions | None = None
    renoise: torch.Tensor | None = None  # (B, K - 1, ...) backward simulation's eps
    dmd_t: torch.Tensor | None = None  # (B,) where R and F compare G's x
    dmd_noise: torch.Tensor | None = None
    fake_t: torch.Tensor | None = None  # (B,) where F learns G's sample (a second one: F's own)
    fake_noise: torch.Tensor | None = None
    real: torch.Tensor | None = None  # (B, ...) the clips' latents, for the GAN head (None when off)
    real_mask: torch.Tensor | None = None  # (B,) 1 where the clip is of a real tier (strict)
    real_t: torch.Tensor | None = None
    real_noise: torch.Tensor | None = None


class GANHead(nn.Module):
    """Features (B F, C, h, w) of F's denoising mid-block -> (B,) logits: conv, norm, SiLU, a 1x1 conv
    to one channel, averaged over frames and space. The last conv starts at zero (logit 0: D's loss
    2 ln 2, G's ln 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(min(32, channels), channels),
                                  nn.SiLU(), nn.Conv2d(channels, 1, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, features: torch.Tensor, batch_size: int) -> torch.Tensor:
        return self.body(features).float().reshape(batch_size, -1).mean(1)


class FakeScore(nn.Module):
    """F: a trainable copy of the teacher (`score`), and the GAN head on its mid-block when on (one
    network, one optimizer, as DMD2 trains them). Called as the teacher is; `with_logits` also gives
    the head's (B,) logits from the same pass, inside this module's forward (where FSDP gathers the
    head's weights with the rest of this root's). `reference_grad` False: the reference bank is made
    without gradient, for G's update (a gradient into the bank would enter the reference net's
    blocks past their outputs, where FSDP2 does not gather their weights for backward)."""

    def __init__(self, score: nn.Module, head: GANHead | None = None):
        super().__init__()
        self.score, self.head = score, head

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditions, with_logits: bool = False,
                reference_grad: bool = True):
        reference = None
        if not reference_grad:  # G's update: the reference bank depends on the conditions only, not on G's x
            with torch.no_grad():
                reference = self.score.encode_reference(cond)
        if not with_logits:
            return self.score(x_t, timestep, cond, reference=reference)
        features = []
        hook = self.score.denoising_net.mid_block.register_forward_hook(lambda m, args, out: features.append(out))
        try:
            pred = self.score(x_t, timestep, cond, reference=reference)
        finally:
            hook.remove()
        return pred, self.head(features[-1], len(x_t))

    def sharding_units(self) -> list[nn.Module]:
        return self.score.sharding_units()


class DMD(CFGDistiller):
    """generator_steps: G's steps (4); two_time_scale: G steps once every N steps, F every step (5;
    DMD2 used 10 for SD1.5); fake_lr, fake_betas, fake_grad_clip: F's AdamW (DMD2: 1e-5);
    dmd_range: where the scores compare G's samples, as fractions of T; gan_gen_weight (0: no GAN
    head; DMD2: 1e-3), gan_head_weight (DMD2: 1e-2), real_tiers: the GAN head (module docstring).
    The CFG-teacher arguments are `CFGDistiller`'s; DMD runs guided (R's Eq 9 is what G learns to
    make in one pass a step)."""

    def __init__(self, generator_steps: int = 4, two_time_scale: int = 5, fake_lr: float = 1e-5,
                 fake_betas: tuple[float, float] = (0.9, 0.999), fake_grad_clip: float | None = 10.0,
                 dmd_range: tuple[float, float] = (0.02, 0.98), gan_gen_weight: float = 0.0,
                 gan_head_weight: float = 1e-2, real_tiers: tuple[str, ...] = ("strict",), mode: str = "guided",
                 sample_steps: int = 4, **kwargs):
        super().__init__(mode=mode, sample_steps=sample_steps, **kwargs)
        if mode != "guided":
            raise ValueError("DMD's real score is the teacher's Eq 9: mode must be guided (its student samples "
                             "with one pass a step)")
        self.check_sample_steps(sample_steps, generator_steps)
        if two_time_scale < 1 or not 0 <= dmd_range[0] < dmd_range[1] <= 1:
            raise ValueError(f"DMD needs two_time_scale >= 1 and 0 <= low < high <= 1, got {two_time_scale}, {dmd_range}")
        if gan_gen_weight < 0 or gan_head_weight <= 0:
            raise ValueError(f"DMD needs gan_gen_weight >= 0 and gan_head_weight > 0, got {gan_gen_weight}, "
                             f"{gan_head_weight}")
        self.generator_steps, self.dmd_range = generator_steps, tuple(dmd_range)
        self.gan_gen_weight, self.gan_head_weight, self.real_tiers = gan_gen_weight, gan_head_weight, tuple(real_tiers)
        self.student_every = two_time_scale
        self.fake = Optimization(lr=fake_lr, betas=tuple(fake_betas), grad_clip=fake_grad_clip)

    def check_sample_steps(self, sample_steps: int, generator_steps: int) -> None:
        if sample_steps != generator_steps:
            raise ValueError(f"DMD samples at the steps it trains: sample_steps {sample_steps} must equal "
                             f"generator_steps {generator_steps}")

    @property
    def gan(self) -> bool:
        return self.gan_gen_weight > 0

    def build_networks(self, teacher, student):
        head = None
        if self.gan:  # from a fixed seed: every rank, and every run of a config, starts from the same head
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                head = GANHead(teacher.denoising_net.config.block_out_channels[-1])
            head = head.to(next(teacher.parameters()).device)
        self.add_network("fake_score", FakeScore(copy.deepcopy(teacher), head), self.fake)

    # ---- time: the generator's steps ---------------------------------------------------------
    def generator_timesteps(self, device=None) -> torch.Tensor:
        return dmd.generator_timesteps(self.generator_steps, self.num_train_timesteps).to(device)

    def sample_time(self, batch_size: int, device, generator=None) -> torch.Tensor:
        """The time (n + 1) / T of the generator step that gets the gradient, one for the whole batch."""
        gen_device = generator.device if generator is not None else device
        k = torch.randint(0, self.generator_steps, (1,), generator=generator, device=gen_device).to(device)
        return ((self.generator_timesteps(device)[k] + 1) / self.num_train_timesteps).expand(batch_size)

    def steps_before(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) the generator step k of each timestep."""
        return (timestep.long()[:, None] == self.generator_timesteps(timestep.device)).float().argmax(1)

    # ---- the job: every draw of the step -------------------------------------------------------
    def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None) -> DMDTargets:
        gen_device = generator.device if generator is not None else z0.device
        b, T = len(t), self.num_train_timesteps

        def normal(*shape):
            return torch.randn(shape, generator=generator, device=gen_device).to(z0)

        def index(low: int, high: int):  # (B,) uniform on {low .. high}
            return torch.randint(low, high + 1, (b,), generator=generator, device=gen_device).to(z0.device)

        cond = condition_dropout(cond, *self.p_drop, generator=generator)
        ref_scale, audio_scale = self.guidance_scales(b, z0.device, generator)
        timestep = (t * T - 1).round()
        job = DMDTargets(z=eps, timestep=timestep, cond=cond.with_guidance(ref_scale, audio_scale), eps_target=None,
                         abar=self.alphas_cumprod[timestep.long()], weight=torch.ones_like(t), real_cond=cond,
                         renoise=normal(b, self.generator_steps - 1, *z0.shape[1:]),
                         dmd_t=dmd.dmd_timesteps(b, T, *self.dmd_range, generator, z0.device),
                         dmd_noise=normal(*z0.shape), fake_t=index(0, T - 1), fake_noise=normal(*z0.shape))
        if self.gan:
            mask = [True] * b if tiers is None else [tier in self.real_tiers for tier in tiers]
            job = replace(job, real=z0, real_mask=torch.tensor(mask, device=z0.device, dtype=z0.dtype),
                          real_t=index(0, T - 1), real_noise=normal(*z0.shape))
        return job

    def generator_x0(self, student, z: torch.Tensor, timestep: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """G's one step: its output at `timestep` (B,) read as x0."""
        abar = self.abar(timestep.long(), z)
        return S.eps_to_x0(z, S.to_eps(student(z, timestep, cond), z, abar, self.prediction_type), abar)

    def generator_input(self, student, job: DMDTargets) -> torch.Tensor:
        """Backward simulation (under no_grad): each clip's input at its step k, from pure noise; every
        rank runs the largest k of any rank's passes."""
        k = self.steps_before(job.timestep)
        passes = k.max()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(passes, op=dist.ReduceOp.MAX)
        with torch.no_grad():
            return dmd.backward_simulation(lambda x, n: self.generator_x0(student, x, n.float(), job.cond), job.z,
                                           self.generator_timesteps(job.z.device), k, self.alphas_cumprod,
                                           job.renoise, int(passes))

    def sample(self, student, job: DMDTargets) -> torch.Tensor:
        """A G sample x (x0 at each clip's step k), without gradient."""
        with torch.no_grad():
            return self.generator_x0(student, self.generator_input(student, job), job.timestep, job.cond)

    def x0_of(self, eps_fn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return S.eps_to_x0(x_t, eps_fn(x_t, t), self.abar(t, x_t))

    def fake_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditions, reference_grad: bool = True):
        """F's prediction at x_t, and with the GAN head its (B,) logits from the same pass (else None)."""
        net = self.networks["fake_score"]
        if self.gan:
            return net(x_t, t, cond, with_logits=True, reference_grad=reference_grad)
        return net(x_t, t, cond, reference_grad=reference_grad), None

    # ---- the losses ----------------------------------------------------------------------------
    def student_loss(self, student, job: DMDTargets):
        """The DMD loss of G's one step with gradient (its value means little: watch the gradient norm),
        plus the GAN term when on."""
        x = self.generator_x0(student, self.generator_input(student, job), job.timestep, job.cond)
        loss, logs, logits = self.matching_loss(x, job)
        if self.gan:
            gan_loss = F_.softplus(-logits).mean()
            loss = loss + self.gan_gen_weight * gan_loss
            logs.update({"gan/g_loss": gan_loss.detach(), "gan/logit_generated": logits.detach().mean()})
        return loss, logs

    def held_out_loss(self, student, job: DMDTargets) -> torch.Tensor:
        """The mean gap |x0_fake - x0_real| between F's and R's denoised views of G's sample: what DMD's
        gradient is made of, zero when G's distribution is R's (as far as F has followed G)."""
        return self.matching_loss(self.sample(student, job), job)[1]["dmd/x0_gap"].mean()

    def matching_loss(self, x: torch.Tensor, job: DMDTargets):
        """The DMD loss of G's sample x (B, ...), x noised to job.dmd_t and R's and F's x0 there -> (loss,
        logs, with the GAN head the (B,) logits of x noised, with gradient to x, else None)."""
        t, abar = job.dmd_t, self.abar(job.dmd_t, x)
        x_t = S.add_noise(x if self.gan else x.detach(), job.dmd_noise, abar)  # D's verdict reaches G through x_t
        with torch.no_grad():
            x0_real = self.x0_of(self.eps_fn(self.teacher, job.real_cond, *job.cond.guidance.unbind(1)), x_t, t)
        with torch.set_grad_enabled(self.gan and torch.is_grad_enabled()):
            pred, logits = self.fake_score(x_t, t, job.real_cond, reference_grad=False)
        x0_fake = S.eps_to_x0(x_t, S.to_eps(pred, x_t, abar, self.prediction_type), abar).detach()
        grad = dmd.dmd_gradient(x.detach(), x0_real, x0_fake)
        return dmd.dmd_loss(x, grad), {"dmd/x0_gap": (x0_fake - x0_real).abs().flatten(1).mean(1)}, logits

    def network_loss(self, name, student, job: DMDTargets):
        """F's denoising loss on a fresh G sample, in the network's own parameterisation; with the GAN
        head also D's loss, G's sample (noised) against the real clips (noised), in the same pass."""
        x = self.sample(student, job)
        t, abar = job.fake_t, self.abar(job.fake_t, x)
        x_t = S.add_noise(x, job.fake_noise, abar)
        if not self.gan:
            pred, _ = self.fake_score(x_t, t, job.real_cond)
        else:  # one (2B) pass: G's samples, then the real clips
            real_t = S.add_noise(job.real, job.real_noise, self.abar(job.real_t, job.real))
            pred, logits = self.fake_score(torch.cat([x_t, real_t]), torch.cat([t, job.real_t]),
                                           Conditions.cat([job.real_cond, job.real_cond]))
            pred, (fake_logits, real_logits) = pred[:len(x)], logits.chunk(2)
        loss = (pred.float() - S.from_eps(job.fake_noise, x_t, abar, self.prediction_type)).pow(2).mean()
        logs = {"fake_score/denoising_loss": loss.detach()}
        if self.gan:
            real_loss = (F_.softplus(-real_logits) * job.real_mask).sum() / job.real_mask.sum().clamp(min=1)
            d_loss = F_.softplus(fake_logits).mean() + real_loss
            loss = loss + self.gan_head_weight * d_loss
            logs.update({"gan/d_loss": d_loss.detach(), "gan/logit_real": real_logits.detach().mean(),
                         "gan/logit_fake": fake_logits.detach().mean()})
        return loss, logs

    def scheduler(self) -> DMDScheduler:
        return DMDScheduler(**self.schedule_config, prediction_type=self.prediction_type)
