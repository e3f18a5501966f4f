"""Adversarial distillation from 4 steps to 1 (TurboTalk stage 2; SPEC 3b, our reading, after LADD and DMD2).

    G   the student, started from a stage-1 (DMD) student: `DistillModule(student_ckpt=...)`
    G4  a frozen copy of that starting student: the few-step reference (its 4-step chain)
    D   timestep-conditioned heads on the decoder blocks of a backbone: the frozen teacher (LADD) or a
        trainable copy of it (`backbone`), one logit per head and clip

A training step draws, per clip, the generator step G starts from (`step_schedule`: progressive by
default, p(999) = 1/4 + 3/4 min(1, k/K) at training step k) and runs G4's whole chain from the clip's
noise without gradient: G's input is the chain's state at the drawn step, and the chain's output is the
positive side (self-compare: for the same noise and conditions, what 4 steps make). G's one step from
there is the negative side. Both sides are re-noised to the same t-hat (toward high noise) with the same
eps before D sees them:

    L_D = softplus(D(G's x)) + (1 - w) softplus(-D(G4's x)) + w softplus(-D(real clip)) + r1_weight R1
                                                     (w = 0 for a clip of no real tier)
    L_G = softplus(-D(G's x)) + dmd_weight L_DMD

w = `real_weight` (real clips of `real_tiers`; 1: real clips only, no self-compare), R1 the approximate
one on the positive side (fada_lightning/diffusion/adversarial.py), L_DMD stage 1's loss (off by default;
when on, DMD's fake score trains beside D). Every draw of a step is in the job, one row per clip, so a
step is the same on 1 or P processes. G samples with `DMDScheduler` at 1 step (1 NFE per window), or
at 2 or 4 of the generator's timesteps.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F_
from diffusers.models.embeddings import get_timestep_embedding
from lightning.pytorch.cli import instantiate_class
from torch import nn

from fada_lightning.diffusion import adversarial as adv
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions
from fada_lightning.diffusion.sampling import conditional_denoiser

from .base import Optimization
from .dmd import DMD, DMDTargets

BACKBONES = ("teacher", "trainable")


# ---- which step G trains from ------------------------------------------------------------------
class StepSchedule(nn.Module):
    """Probabilities over the generator's S timesteps (index 0: pure noise, the one-step input) as a
    function of the training step; `step` (a buffer: in the checkpoint) is the step it is at, set by the
    distiller at the start of each training step."""

    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def probabilities(self, step: int, num_steps: int) -> torch.Tensor:
        """(S,) float64, summing to 1."""
        raise NotImplementedError

    def spec(self) -> dict:
        """{class_path, init_args} that rebuild this schedule (its constructor's arguments, kept as
        attributes of the same names): what a checkpoint records."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {name: getattr(self, name) for name in names}}

    def draw(self, batch_size: int, num_steps: int, generator: torch.Generator | None = None,
             device=None) -> torch.Tensor:
        """(B,) generator step indices, one per clip, at the current step."""
        gen_device = generator.device if generator is not None else device
        p = self.probabilities(int(self.step), num_steps).float().to(gen_device)
        return torch.multinomial(p.expand(batch_size, -1), 1, replacement=True, generator=generator)[:, 0].to(device)


class Progressive(StepSchedule):
    """p(step 0) = 1/S + (1 - 1/S) min(1, k / ramp_steps), the rest shared evenly: uniform over the S steps
    at k = 0, only the one-step input from k = ramp_steps on (SPEC 3b's reading; ramp_steps 0: one step
    from the start, no progressive sampling)."""

    def __init__(self, ramp_steps: int = 300):
        super().__init__()
        if ramp_steps < 0:
            raise ValueError(f"Progressive needs ramp_steps >= 0, got {ramp_steps}")
        self.ramp_steps = ramp_steps

    def probabilities(self, step: int, num_steps: int) -> torch.Tensor:
        ramp = 1.0 if step >= self.ramp_steps else step / self.ramp_steps
        first = 1 / num_steps + (1 - 1 / num_steps) * ramp
        rest = (1 - first) / (num_steps - 1) if num_steps > 1 else 0.0
        return torch.tensor([first] + [rest] * (num_steps - 1), dtype=torch.float64)


class Staged(StepSchedule):
    """Uniform over the timesteps of an n-step sampler, n from `stages` in turn ((4, 2, 1): the 4-step
    set, then {999, 499}, then 999 alone), each stage `stage_steps` training steps long; the last stage
    lasts. Each n divides the generator's S, so its timesteps are among G4's."""

    def __init__(self, stages: tuple[int, ...] = (4, 2, 1), stage_steps: int = 100):
        super().__init__()
        if not stages or stage_steps < 1 or any(n < 1 for n in stages):
            raise ValueError(f"Staged needs stages of >= 1 steps and stage_steps >= 1, got {stages}, {stage_steps}")
        self.stages, self.stage_steps = tuple(stages), stage_steps

    def probabilities(self, step: int, num_steps: int) -> torch.Tensor:
        n = self.stages[min(step // self.stage_steps, len(self.stages) - 1)]
        if num_steps % n:
            raise ValueError(f"Staged stage of {n} steps: its timesteps are not among the generator's {num_steps}")
        p = torch.zeros(num_steps, dtype=torch.float64)
        p[:: num_steps // n] = 1 / n
        return p


# ---- the discriminator ------------------------------------------------------------------------------
class TimestepHead(nn.Module):
    """One decoder block's features (B F, C, h, w) and t-hat's embedding (B F, E) -> (B,) logits: conv 3x3,
    GroupNorm modulated by t-hat (scale, shift), SiLU, a 1x1 conv to one channel (starting near zero:
    logits ~0, D's loss ~2 ln 2), averaged over frames and space."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(min(32, channels), channels, affine=False)
        self.modulation = nn.Linear(embed_dim, 2 * channels)
        self.out = nn.Conv2d(channels, 1, 1)
        with torch.no_grad():  # near zero, not zero: G's first step already gets D's (small) gradient
            self.out.weight.mul_(1e-2)
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor, embedding: torch.Tensor, batch_size: int) -> torch.Tensor:
        scale, shift = self.modulation(embedding)[..., None, None].chunk(2, 1)
        h = F_.silu(self.norm(self.conv(features)) * (1 + scale) + shift)
        return self.out(h).float().reshape(batch_size, -1).mean(1)


class Discriminator(nn.Module):
    """Heads on the decoder blocks `blocks` (indices into the denoising UNet's up_blocks) of a backbone
    denoiser: `backbone` its own trainable copy, or None to run on the one given at call time (the frozen
    teacher: then D trains its heads only). Called like a denoiser, with t-hat; -> (B, H) logits.
    `backbone_grad` False (G's update): the backbone's reference bank is made without gradient (G's
    gradient needs none there, and one entering the reference net's blocks past their outputs would
    find them sharded under FSDP2)."""

    def __init__(self, channels: list[int], blocks: list[int], backbone: nn.Module | None = None, embed_dim: int = 128):
        super().__init__()
        self.blocks, self.embed_dim, self.backbone = list(blocks), embed_dim, backbone
        self.time_embedding = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU())
        self.heads = nn.ModuleList(TimestepHead(channels[i], embed_dim) for i in self.blocks)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditions,
                backbone: nn.Module | None = None, backbone_grad: bool = True) -> torch.Tensor:
        net = self.backbone if self.backbone is not None else backbone
        reference = None
        if self.backbone is None or not backbone_grad:  # the bank depends on the conditions only: without
            with torch.no_grad():                        # gradient unless D's own backbone trains (D's update)
                reference = net.encode_reference(cond)
        up_blocks = net.denoising_net.up_blocks
        features = {}
        hooks = [up_blocks[i].register_forward_hook(lambda m, args, out, i=i: features.__setitem__(i, out))
                 for i in self.blocks]
        try:
            net(x_t, timestep, cond, reference=reference)
        finally:
            for hook in hooks:
                hook.remove()
        b, frames = x_t.shape[:2]
        sinusoid = get_timestep_embedding(timestep.float(), self.embed_dim).to(features[self.blocks[0]].dtype)
        embedding = self.time_embedding(sinusoid).repeat_interleave(frames, 0)
        return torch.stack([head(features[i], embedding, b) for head, i in zip(self.heads, self.blocks)], 1)

    def sharding_units(self) -> list[nn.Module]:
        return self.backbone.sharding_units() if self.backbone is not None else []


@dataclass
class AdversarialTargets(DMDTargets):
    """DMD's job (its draws serve the optional DMD term), with `z` G's input at its drawn step (G4's chain
    state there) and: `positive` G4's 4-step output from the same noise, `d_t`, `d_noise` where both sides
    are re-noised for D, `r1_noise` the approximate R1's perturbation."""

    positive: torch.Tensor | None = None
    d_t: torch.Tensor | None = None
    d_noise: torch.Tensor | None = None
    r1_noise: torch.Tensor | None = None


class Adversarial(DMD):
    """step_schedule: a `StepSchedule` (YAML: class_path, init_args; default Progressive(ramp_steps=300));
    backbone: "teacher" (frozen, heads trained) or "trainable" (a copy of the teacher trained with the heads);
    head_blocks: decoder blocks with a head (default all); d_lr, d_betas, d_grad_clip: D's AdamW;
    d_timestep_loc, d_timestep_scale: t-hat = T sigmoid(N(loc, scale^2)); real_weight, real_tiers: real
    clips' share of D's positive side; r1_weight, r1_sigma: the approximate R1; dmd_weight: stage 1's loss on
    G (0: off; on, DMD's fake score trains too, with DMD's fake_* arguments); sample_steps: 1, 2 or 4 (of
    generator_steps). The rest are DMD's (two_time_scale: G steps every N steps, D every step) and
    CFGDistiller's (guided mode; G and G4 are told the scales)."""

    def __init__(self, step_schedule: StepSchedule | None = None, backbone: str = "teacher",
                 head_blocks: tuple[int, ...] | None = None, d_lr: float = 1e-4,
                 d_betas: tuple[float, float] = (0.0, 0.99), d_grad_clip: float | None = 10.0,
                 d_timestep_loc: float = 1.0, d_timestep_scale: float = 1.0, real_weight: float = 0.0,
                 r1_weight: float = 1.0, r1_sigma: float = 0.1, dmd_weight: float = 0.0, two_time_scale: int = 1,
                 sample_steps: int = 1, **kwargs):
        if kwargs.get("gan_gen_weight", 0):
            raise ValueError("Adversarial has its own discriminator: DMD's GAN head (gan_gen_weight) stays off")
        super().__init__(two_time_scale=two_time_scale, sample_steps=sample_steps, **kwargs)
        if backbone not in BACKBONES:
            raise ValueError(f"Adversarial backbone must be one of {BACKBONES}, got {backbone!r}")
        if not 0 <= real_weight <= 1 or r1_weight < 0 or r1_sigma <= 0 or dmd_weight < 0:
            raise ValueError(f"Adversarial needs 0 <= real_weight <= 1, r1_weight >= 0, r1_sigma > 0 and dmd_weight >= 0, "
                             f"got {real_weight}, {r1_weight}, {r1_sigma}, {dmd_weight}")
        self.backbone, self.head_blocks = backbone, None if head_blocks is None else list(head_blocks)
        self.d_timesteps = (d_timestep_loc, d_timestep_scale)
        self.real_weight, self.r1_weight, self.r1_sigma, self.dmd_weight = real_weight, r1_weight, r1_sigma, dmd_weight
        self.discriminator = Optimization(lr=d_lr, betas=tuple(d_betas), grad_clip=d_grad_clip)
        if isinstance(step_schedule, dict):  # a spec, as a checkpoint records it
            step_schedule = instantiate_class((), step_schedule)
        if not isinstance(step_schedule, (StepSchedule, type(None))):
            raise ValueError(f"step_schedule must be a StepSchedule, got {type(step_schedule).__name__}")
        self.step_schedule = step_schedule if step_schedule is not None else Progressive()
        self.hparams["step_schedule"] = self.step_schedule.spec()  # recorded as its spec, not the object

    def check_sample_steps(self, sample_steps: int, generator_steps: int) -> None:
        if sample_steps < 1 or generator_steps % sample_steps:
            raise ValueError(f"Adversarial samples at some of G4's {generator_steps} timesteps: sample_steps "
                             f"{sample_steps} must divide generator_steps")

    def build_networks(self, teacher, student):
        if self.dmd_weight > 0:
            super().build_networks(teacher, student)  # DMD's fake score
        up_blocks = teacher.denoising_net.up_blocks
        channels = [block.resnets[-1].out_channels for block in up_blocks]
        blocks = list(range(len(up_blocks))) if self.head_blocks is None else self.head_blocks
        if not blocks or any(not 0 <= i < len(up_blocks) for i in blocks):
            raise ValueError(f"Adversarial head_blocks {blocks}: the backbone has decoder blocks 0 .. {len(up_blocks) - 1}")
        with torch.random.fork_rng(devices=[]):  # the same heads on every rank and in every run of a config
            torch.manual_seed(0)
            d = Discriminator(channels, blocks, copy.deepcopy(teacher) if self.backbone == "trainable" else None)
        self.add_network("discriminator", d.to(next(teacher.parameters()).device), self.discriminator)
        self.add_frozen("g4", copy.deepcopy(student))

    def begin_step(self, step: int) -> None:
        self.step_schedule.step.fill_(step)

    # ---- time: G's step, drawn per clip -------------------------------------------------------------
    def sample_time(self, batch_size: int, device, generator=None) -> torch.Tensor:
        """The time (n + 1) / T of each clip's generator step, drawn from `step_schedule`."""
        k = self.step_schedule.draw(batch_size, self.generator_steps, generator, device)
        return (self.generator_timesteps(device)[k] + 1) / self.num_train_timesteps

    def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None) -> AdversarialTargets:
        job = super().make_targets(teacher, z0, cond, t, eps, generator, tiers)
        gen_device = generator.device if generator is not None else z0.device

        def normal():
            return torch.randn(z0.shape, generator=generator, device=gen_device).to(z0)

        denoise = conditional_denoiser(self.frozen["g4"], job.cond)  # G4: its reference bank once, 4 passes
        inputs, positive = adv.sampling_chain(
            lambda x, n: S.eps_to_x0(x, S.to_eps(denoise(x, n.float()), x, self.abar(n, x), self.prediction_type),
                                     self.abar(n, x)),
            job.z, self.generator_timesteps(z0.device), self.alphas_cumprod, job.renoise)
        k = self.steps_before(job.timestep)
        job = AdversarialTargets(**{**vars(job), "z": inputs[torch.arange(len(k), device=k.device), k]},
                                 positive=positive, d_noise=normal(), r1_noise=normal(),
                                 d_t=adv.noise_level_timesteps(len(t), self.num_train_timesteps, *self.d_timesteps,
                                                               generator, z0.device))
        if self.real_weight > 0:
            mask = [True] * len(t) if tiers is None else [tier in self.real_tiers for tier in tiers]
            job = replace(job, real=z0, real_mask=torch.tensor(mask, device=z0.device, dtype=z0.dtype))
        return job

    def generator_input(self, student, job: AdversarialTargets) -> torch.Tensor:
        """G's input: G4's chain state at each clip's step (made with the job)."""
        return job.z

    # ---- the losses ---------------------------------------------------------------------------------
    def discriminate(self, x: torch.Tensor, job: AdversarialTargets, backbone_grad: bool = True) -> torch.Tensor:
        """x (n B, ...), n sides of the batch -> (n B, H) logits, each side re-noised to job.d_t with job.d_noise."""
        n = len(x) // len(job.d_t)
        t, noise = job.d_t.repeat(n), job.d_noise.repeat(n, *[1] * (x.ndim - 1))
        x_t = S.add_noise(x, noise, self.abar(t, x))
        return self.networks["discriminator"](x_t, t, Conditions.cat([job.real_cond] * n), backbone=self.teacher,
                                              backbone_grad=backbone_grad)

    def student_loss(self, student, job: AdversarialTargets):
        """softplus(-D(G's x)) (D's verdict reaching G through the re-noised x), plus the DMD term when on."""
        x = self.generator_x0(student, job.z, job.timestep, job.cond)
        logits = self.discriminate(x, job, backbone_grad=False)
        loss = adv.generator_loss(logits)
        logs = {"adversarial/g_loss": loss.detach(), "adversarial/logit_generated": logits.detach().mean()}
        if self.dmd_weight > 0:
            matching, matching_logs, _ = self.matching_loss(x, job)
            loss = loss + self.dmd_weight * matching
            logs.update(matching_logs)
        return loss, logs

    def held_out_loss(self, student, job: AdversarialTargets) -> torch.Tensor:
        """mean |G's x - G4's x|^2 for the same noise and conditions: how far G's steps are from what G4's
        whole chain makes (self-compare's positive), each clip from the step `step_schedule` draws now (pure
        noise once a progressive ramp is over: watch it after the ramp). D's and G's losses chase each other
        and do not settle."""
        with torch.no_grad():
            return (self.generator_x0(student, job.z, job.timestep, job.cond) - job.positive).square().mean()

    def positive_sides(self, job: AdversarialTargets) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """D's positive sides as (name, clips (B, ...), row weights (B,)): per clip, G4's output at share
        1 - w and the clip itself at share w (`real_weight`) if of a real tier, normalised to 1 per clip and
        1 / B over the batch (a clip with no positive at all, w = 1 and not real, counts 0), so D's loss
        is a mean over clips: the same on 1 or P processes."""
        b, w, device, shares = len(job.d_t), self.real_weight, job.d_t.device, []
        if w < 1:
            shares.append(("g4", job.positive, torch.full((b,), 1 - w, device=device)))
        if w > 0:
            shares.append(("real", job.real, w * job.real_mask))
        total = sum(share for _, _, share in shares)
        return [(name, clips, torch.where(total > 0, share / total.clamp(min=1e-12), 0.0) / b)
                for name, clips, share in shares]

    def network_loss(self, name, student, job: AdversarialTargets):
        """D's loss: G's sample (no gradient) against the positive sides, plus the approximate R1 on them,
        all in one D pass; DMD's fake score's when the DMD term is on."""
        if name != "discriminator":
            return super().network_loss(name, student, job)
        with torch.no_grad():
            x = self.generator_x0(student, job.z, job.timestep, job.cond)
        names, clips, weights = zip(*self.positive_sides(job))
        perturbed = [c + self.r1_sigma * job.r1_noise for c in clips] if self.r1_weight > 0 else []
        logits = self.discriminate(torch.cat([x, *clips, *perturbed]), job).split(len(x))
        fake, positive, weight = logits[0], torch.cat(logits[1:1 + len(clips)]), torch.cat(weights)
        loss = adv.discriminator_loss(fake, positive, weight)
        logs = {"adversarial/d_loss": loss.detach(), "adversarial/logit_fake": fake.detach().mean(),
                **{f"adversarial/logit_{n}": side.detach().mean() for n, side in zip(names, logits[1:])}}
        if self.r1_weight > 0:
            r1 = adv.weighted_sum(adv.approximate_r1(positive, torch.cat(logits[1 + len(clips):])), weight)
            loss = loss + self.r1_weight * r1
            logs["adversarial/r1"] = r1.detach()
        return loss, logs
