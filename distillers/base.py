"""The distiller contract: the only things a distillation method decides.

    z0, cond = encode(batch)                            # latents (B, F, C, h, w), Conditions
    eps = randn_like(z0)
    t = distiller.sample_time(B, device, generator)     # 1. how the training time is sampled
    with no_grad():                                     # 2. the frozen networks: one no-grad call
        job = distiller.make_targets(teacher, z0, cond, t, eps, generator, tiers=batch["tier"])
    pred = student(job.z, job.timestep, job.cond)       #    the student's raw output
    loss, logs = distiller.loss(pred, job)              # 3. how the loss is reduced and weighted
    distiller.scheduler(), .sample_steps, .sample_cfg   # 4. how the student samples
    (and .sample_eta)

That loop is `DistillModule.training_step`; it never asks which distiller it runs. Besides the
teacher, `make_targets` may use `self.student_ema` (the student's EMA, a consistency method's
target network), which the module hands over in `bind`; `tiers` names each clip's data tier
(the shard set it came from, "strict" / "lenient"), for methods that treat tiers differently.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from torch import nn

from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions, condition_dropout
from fada_lightning.diffusion.sampling import conditional_denoiser, guided_denoiser


@dataclass
class DistillTargets:
    """What `make_targets` hands the student: train student(z, timestep, cond), read as eps at
    noise level `abar`, towards `eps_target`, with a per-sample loss weight."""

    z: torch.Tensor  # (B, F, C, h, w) the student's input
    timestep: torch.Tensor  # (B,) the student's timestep
    cond: Conditions  # the conditions the student sees
    eps_target: torch.Tensor  # (B, F, C, h, w) the target, in eps space
    abar: torch.Tensor  # (B,) where a v-network's output is read as eps
    weight: torch.Tensor  # (B,) per-sample loss weight


class Distiller(HyperparametersMixin, nn.Module):
    """Base class of every distillation method (see the module docstring for the loop that runs it).

    Hooks, each overridable on its own:
      sample_time(B, device, generator) -> t (B,) in (0, 1]       default: uniform on the 1/T grid
      make_targets(teacher, z0, cond, t, eps, generator, tiers)    required: -> DistillTargets
      loss(pred, job) -> (scalar, {name: scalar to log})           default: weighted ||eps_theta - eps_target||^2
      scheduler() -> a diffusers scheduler for the student          required
      sample_cfg: True -> Eq 9's three passes a step at inference, False -> one pass
      sample_eta: a stochasticity the scheduler's `step(..., eta=)` takes (TCD's gamma), or None
    Helpers: `abar(n, like)`, `to_eps(pred, z, abar)`, `eps_fn(net, cond, ...)`, `nfe(steps)`; the module
    calls `bind(schedule, prediction_type, student_ema)` once, before any hook runs.

    A distiller's constructor arguments are its config (YAML `init_args`) and are recorded by
    `save_hyperparameters`, so a student checkpoint can rebuild it (`spec()`).

    Worked example: PeRFlow whose loss weighs noisier times more. In `my_distillers.py`:

        from dataclasses import replace
        from distillers.perflow import PeRFlow

        class NoisyFirst(PeRFlow):
            def __init__(self, power: float = 1.0, num_windows: int = 4, solver_steps: int = 8):
                super().__init__(num_windows=num_windows, solver_steps=solver_steps)

            def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None):
                job = super().make_targets(teacher, z0, cond, t, eps, generator, tiers)
                return replace(job, weight=job.weight * (2 * t) ** self.hparams.power)

    and in a copy of distill_perflow.yaml: `distiller: {class_path: my_distillers.NoisyFirst,
    init_args: {power: 2.0}}`; `fada fit --config my.yaml` from that directory.
    """

    sample_cfg: bool = True
    sample_eta: float | None = None

    def __init__(self, sample_steps: int = 6):
        super().__init__()
        self.save_hyperparameters()
        self.sample_steps = sample_steps
        self.prediction_type, self.schedule_config = "epsilon", {}
        self.register_buffer("alphas_cumprod", torch.empty(0), persistent=False)
        self._student_ema: tuple[nn.Module | None] = (None,)

    def bind(self, schedule: dict, prediction_type: str, student_ema: nn.Module | None = None) -> None:
        """The teacher's noise schedule (diffusers config keys), its (and so the student's) output
        parameterisation, and the student's EMA network if the module keeps one."""
        self.schedule_config = {k: schedule[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
        self.alphas_cumprod = S.alphas_cumprod(schedule).float().to(self.alphas_cumprod.device)
        self.prediction_type = S.check_prediction_type(prediction_type)
        self._student_ema = (student_ema,)  # a reference, not a submodule: the module owns and saves it

    @property
    def student_ema(self) -> nn.Module | None:
        return self._student_ema[0]

    def spec(self) -> dict:
        """{class_path, init_args} that rebuild this distiller: the recorded arguments that its own
        constructor takes (a subclass fixes the rest of its parents' arguments itself)."""
        params = inspect.signature(type(self).__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        init_args = {k: v for k, v in self.hparams.items() if takes_any or k in params}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def nfe(self, steps: int | None = None) -> int:
        """Network evaluations per clip window when the student samples with `steps` (default its own)."""
        return (steps or self.sample_steps) * (3 if self.sample_cfg else 1)

    # ---- helpers -------------------------------------------------------------------------
    def abar(self, n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_n (B,) broadcast over like (B, ...)."""
        return S.expand_like(self.alphas_cumprod[n], like)

    def to_eps(self, pred: torch.Tensor, z: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        return S.to_eps(pred, z, S.expand_like(abar, z), self.prediction_type)

    def eps_fn(self, net, cond: Conditions, ref_scale=None, audio_scale=None):
        """(z, n) -> net's eps at DDPM indices n (B,): one conditional pass, or with scales Eq 9's
        three passes as one batch. The reference bank is computed once, here."""
        denoise = (conditional_denoiser(net, cond) if ref_scale is None
                   else guided_denoiser(net, cond, ref_scale, audio_scale))
        return lambda z, n: S.to_eps(denoise(z, n), z, self.abar(n, z), self.prediction_type)

    # ---- hooks ---------------------------------------------------------------------------
    def sample_time(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """t uniform on {1/T, 2/T, ..., 1}."""
        gen_device = generator.device if generator is not None else device
        n = torch.randint(1, self.num_train_timesteps + 1, (batch_size,), generator=generator, device=gen_device)
        return n.to(device) / self.num_train_timesteps

    def make_targets(self, teacher, z0: torch.Tensor, cond: Conditions, t: torch.Tensor, eps: torch.Tensor,
                     generator: torch.Generator | None = None, tiers: list[str] | None = None) -> DistillTargets:
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, job: DistillTargets) -> tuple[torch.Tensor, dict]:
        """mean_B weight * mean ||eps_theta(z_t) - eps_target||^2, the student's output read as eps."""
        return (job.weight * self.eps_error(pred, job)).mean(), {}

    def eps_error(self, pred: torch.Tensor, job: DistillTargets) -> torch.Tensor:
        """(B,) mean ||eps_theta(z_t) - eps_target||^2 per sample, the student's output read as eps."""
        return (self.to_eps(pred.float(), job.z, job.abar) - job.eps_target).pow(2).flatten(1).mean(1)

    def scheduler(self):
        raise NotImplementedError


GUIDANCE_MODES = ("balanced", "guided")


class CFGDistiller(Distiller):
    """A distiller whose teacher target comes one of two ways with multi-CFG (Eq 9):

      balanced  the teacher runs unguided on the student's own conditions, dropped as in teacher
                training: the student learns every CFG branch and samples with Eq 9 (3 passes a step)
      guided    the teacher's output is Eq 9 at (ref_scale, audio_scale) on the full conditions:
                the student learns the guided output and samples with one pass a step

    In guided mode a scale may be a range [low, high]: each clip draws its scale uniformly from it
    (multi-CFG distillation, SPEC Eq 10), and the student's conditions carry the scales drawn
    (`cond.guidance`, (B, 2) = (s_r, s_a)) for a student that takes them as input.
    Subclasses call `guided_teacher(teacher, cond, generator)` in `make_targets`.
    """

    def __init__(self, mode: str = "balanced", ref_scale: float | tuple[float, float] = 2.5,
                 audio_scale: float | tuple[float, float] = 6.5, p_drop_audio: float = 0.05,
                 p_drop_ref_audio: float = 0.05, p_drop_motion: float = 0.05, sample_steps: int = 6):
        super().__init__(sample_steps)
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"{type(self).__name__} mode must be one of {GUIDANCE_MODES}, got {mode!r}")
        for name, scale in (("ref_scale", ref_scale), ("audio_scale", audio_scale)):
            if isinstance(scale, (tuple, list)) and (len(scale) != 2 or scale[0] > scale[1] or mode != "guided"):
                raise ValueError(f"{type(self).__name__} {name} {list(scale)}: a range is [low, high] and only "
                                 f"guided mode draws scales from one")
        self.mode, self.ref_scale, self.audio_scale = mode, ref_scale, audio_scale
        self.p_drop = (p_drop_audio, p_drop_ref_audio, p_drop_motion)

    @property
    def sample_cfg(self) -> bool:
        return self.mode == "balanced"

    def guidance_scales(self, batch_size: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_r, s_a), each (B,), for the teacher's Eq 9 in guided mode: the fixed scales, or uniform
        draws from their ranges."""
        gen_device = generator.device if generator is not None else device

        def draw(scale):
            if not isinstance(scale, (tuple, list)):
                return torch.full((batch_size,), float(scale), device=device)
            u = torch.rand(batch_size, generator=generator, device=gen_device).to(device)
            return scale[0] + (scale[1] - scale[0]) * u

        return draw(self.ref_scale), draw(self.audio_scale)

    def guided_teacher(self, teacher, cond: Conditions, generator=None):
        """-> (the conditions the student sees, the teacher's eps function (z, n) -> eps) for the mode."""
        if self.mode == "balanced":
            cond = condition_dropout(cond, *self.p_drop, generator=generator)
            return cond, self.eps_fn(teacher, cond)
        ref_scale, audio_scale = self.guidance_scales(cond.ref.shape[0], cond.ref.device, generator)
        return cond.with_guidance(ref_scale, audio_scale), self.eps_fn(teacher, cond, ref_scale, audio_scale)
