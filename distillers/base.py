"""The distiller contract: the only things a distillation method decides.

    z0, cond = encode(batch)                            # latents (B, F, C, h, w), Conditions
    eps = randn_like(z0)
    t = distiller.sample_time(B, device, generator)     # 1. how the training time is sampled (1 = noise)
    with no_grad():                                     # 2. the frozen networks: one no-grad call
        job = distiller.make_targets(teacher, z0, cond, t, eps, generator, tiers=batch["tier"])
    for name in distiller.updates(step):                # 3. which networks update this step, in order
        loss, logs = distiller.student_loss(student, job) if name == "student" \
            else distiller.network_loss(name, student, job)  # default student_loss: forward + `loss`
        backward; clip; the network's optimizer and LR scheduler step
    distiller.scheduler(), .sample_steps, .sample_cfg   # 4. how the student samples
    (and .sample_eta)

That loop is `DistillModule.training_step`; it never asks which distiller it runs. A method whose
only trained network is the student overrides `make_targets` and perhaps `loss`; one that trains
networks of its own (DMD's fake score, a discriminator) adds them in `build_networks` with
`add_network(name, net, Optimization(...))` and defines `network_loss` for them; frozen networks of
its own (a copy of the starting student) with `add_frozen(name, net)`. Besides the teacher,
hooks may use `self.teacher` and `self.student_ema` (the student's EMA, a consistency method's
target network), which the module hands over; `tiers` names each clip's data tier (the shard set
it came from, "strict" / "lenient"), for methods that treat tiers differently.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from torch import nn

from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions, condition_dropout
from fada_lightning.diffusion.sampling import conditional_denoiser, guided_denoiser
from fada_lightning.presets import config_arguments


@dataclass
class DistillTargets:
    """What `make_targets` hands the student: train student(z, timestep, cond), read as eps at
    noise level `abar`, towards `eps_target`, with a per-sample loss weight.

    Time: `sample_time` draws t in (0, 1], 1 the noise end and 0 the data end. `timestep` is in
    the teacher's own unit, the DDPM index (float): n = T t - 1, from 0 (least noise) to T - 1
    (pure noise), the unit the student's sampler hands it too (`scheduler().timesteps`)."""

    z: torch.Tensor  # (B, F, C, h, w) the student's input
    timestep: torch.Tensor  # (B,) the student's timestep, in DDPM index units (float)
    cond: Conditions  # the conditions the student sees
    eps_target: torch.Tensor  # (B, F, C, h, w) the target, in eps space
    abar: torch.Tensor  # (B,) where a v-network's output is read as eps
    weight: torch.Tensor  # (B,) per-sample loss weight


    @classmethod
    def cat(cls, jobs: list["DistillTargets"]) -> "DistillTargets":
        """Jobs of the same kind joined along the batch: tensors and conditions concatenated,
        sequences joined, anything else taken from the first."""
        def join(values):
            first = values[0]
            if isinstance(first, torch.Tensor):
                return torch.cat(values)
            if isinstance(first, Conditions):
                return Conditions.cat(values)
            if isinstance(first, (tuple, list)):
                return type(first)(x for v in values for x in v)
            return first
        return type(jobs[0])(**{f.name: join([getattr(j, f.name) for j in jobs]) for f in fields(jobs[0])})


@dataclass
class Optimization:
    """How one trained network is updated: AdamW with these settings and a linear learning-rate
    warm-up over its own first `warmup_steps` updates, its gradient's L2 norm clipped to `grad_clip`
    (None: not clipped), at the training steps s (from 0) with s % every == 0."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    warmup_steps: int = 0
    every: int = 1

    def __post_init__(self):
        if self.every < 1 or self.lr <= 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ValueError(f"Optimization needs every >= 1, lr > 0 and grad_clip > 0 (or None), got {self}")

    def due(self, step: int) -> bool:
        return step % self.every == 0


class Distiller(HyperparametersMixin, nn.Module):
    """Base class of every distillation method (see the module docstring for the loop that runs it).

    Hooks, each overridable on its own:
      sample_time(B, device, generator) -> t (B,) in (0, 1]       default: uniform on the 1/T grid
      make_targets(teacher, z0, cond, t, eps, generator, tiers)    required: -> DistillTargets
      loss(pred, job) -> (scalar, {name: scalar to log})           default: weighted ||eps_theta - eps_target||^2
      student_loss(student, job) -> (scalar, logs)                 default: loss(student(job.z, job.timestep, job.cond), job)
      build_networks(teacher, student)                             default: none; add_network(...) for each
      network_loss(name, student, job) -> (scalar, logs)           required for each network added
      updates(step) -> names of the networks updated at `step`     default: each whose Optimization is due
      begin_step(step)                                             default: nothing; a curriculum's progress
      scheduler() -> a diffusers scheduler for the student          required
      sample_cfg: True -> Eq 9's three passes a step at inference, False -> one pass
      sample_eta: a stochasticity the scheduler's `step(..., eta=)` takes (TCD's gamma), or None
      student_every: the student is updated at steps s with s % student_every == 0 (default 1)
      fixed_targets: True when make_targets depends only on the batch, the generator's draws and the
        frozen networks (no curriculum in sample_time): validation then builds each held-out job once
    Helpers: `abar(n, like)`, `to_eps(pred, z, abar)`, `eps_fn(net, cond, ...)`, `nfe(steps)`. The module
    calls `bind(schedule, prediction_type, student_ema)` once, before any hook runs, and, where it
    trains or evaluates (never to sample), `set_teacher(teacher, student)` once the teacher is loaded
    and the student initialised, which calls `build_networks(teacher, student)`.
    Each key of the `logs` dict a loss returns is logged as `train/<key>` (a (B,) tensor: its mean
    as `train/<key>_mean` and a histogram); each network's loss as `train/<name>_loss` and its
    gradient norm as `train/grad_norm/<name>`.

    A distiller's constructor arguments are its config (YAML `init_args`) and are recorded by
    `save_hyperparameters`, so a student checkpoint can rebuild it (`spec()`).

    Worked example: PeRFlow whose loss weighs noisier times more. In `my_distillers.py`:

        from dataclasses import replace
        from distillers.perflow import PeRFlow

        class NoisyFirst(PeRFlow):
            def __init__(self, power: float = 1.0, **kwargs):  # **kwargs: every PeRFlow argument
                super().__init__(**kwargs)

            def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None):
                job = super().make_targets(teacher, z0, cond, t, eps, generator, tiers)
                return replace(job, weight=job.weight * (2 * t) ** self.hparams.power)

    and in a copy of distill_perflow.yaml: `distiller: {class_path: my_distillers.NoisyFirst,
    init_args: {power: 2.0, solver_steps: 4}}`; `fada fit --config my.yaml` from that directory.
    """

    sample_cfg: bool = True
    sample_eta: float | None = None
    student_every: int = 1
    fixed_targets: bool = False

    def __init__(self, sample_steps: int = 6):
        super().__init__()
        self.save_hyperparameters()
        self.sample_steps = sample_steps
        self.prediction_type, self.schedule_config = "epsilon", {}
        self.register_buffer("alphas_cumprod", torch.empty(0), persistent=False)
        self._frozen: dict[str, nn.Module | None] = {"student_ema": None, "teacher": None}  # references, not submodules
        self.networks = nn.ModuleDict()  # the distiller's own trained networks (`add_network`)
        self.frozen: dict[str, nn.Module] = {}  # its own frozen networks (`add_frozen`): not submodules, not in checkpoints
        self.optimization: dict[str, Optimization] = {}

    def bind(self, schedule: dict, prediction_type: str, student_ema: nn.Module | None = None) -> None:
        """The teacher's noise schedule (diffusers config keys), its (and so the student's) output
        parameterisation, and the student's EMA network if the module keeps one."""
        self.schedule_config = {k: schedule[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
        self.alphas_cumprod = S.alphas_cumprod(schedule).float().to(self.alphas_cumprod.device)
        self.prediction_type = S.check_prediction_type(prediction_type)
        self._frozen["student_ema"] = student_ema  # the module owns and saves it

    @property
    def student_ema(self) -> nn.Module | None:
        return self._frozen["student_ema"]

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher, once the module has loaded it (`set_teacher`)."""
        return self._frozen["teacher"]

    def spec(self) -> dict:
        """{class_path, init_args} that rebuild this distiller: the recorded arguments that its
        constructor takes, its parents' that it forwards by **kwargs included (a subclass fixes the
        rest of its parents' arguments itself)."""
        accepted = config_arguments(type(self))
        init_args = {k: v for k, v in self.hparams.items() if k in accepted}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    @property
    def num_train_timesteps(self) -> int:
        if len(self.alphas_cumprod) == 0:
            raise RuntimeError(f"{type(self).__name__} has no noise schedule yet: DistillModule binds it to its "
                               f"teacher's; outside one, call .bind(schedule, prediction_type) first")
        return len(self.alphas_cumprod)

    def nfe(self, steps: int | None = None) -> int:
        """Network evaluations per clip window when the student samples with `steps` (default its own)."""
        return (steps or self.sample_steps) * (3 if self.sample_cfg else 1)

    # ---- the distiller's own trained networks ----------------------------------------------
    def add_network(self, name: str, net: nn.Module, optimization: Optimization) -> nn.Module:
        """Train `net` beside the student with its own optimizer: it is in the training checkpoint with
        its optimizer state, sharded on its own under FSDP, and left out of sampling."""
        if name == "student" or name in self.networks:
            raise ValueError(f"{type(self).__name__}: a network is already named {name!r}")
        self.networks[name] = net.requires_grad_(True)
        self.optimization[name] = optimization
        return net

    def add_frozen(self, name: str, net: nn.Module) -> nn.Module:
        """Keep `net` frozen beside the teacher: in eval mode, without gradients, moved and sharded with
        the module's networks, and never in a checkpoint (`build_networks` makes it again on resume)."""
        if name in self.frozen:
            raise ValueError(f"{type(self).__name__}: a frozen network is already named {name!r}")
        self.frozen[name] = net.requires_grad_(False).eval()
        return net

    def set_teacher(self, teacher: nn.Module, student: nn.Module | None = None) -> None:
        """The module hands over the frozen teacher once it is loaded, and the student as it starts (the
        teacher's copy, or an earlier stage's student): the teacher kept as `self.teacher` (a reference,
        not a submodule), then `build_networks(teacher, student)`."""
        self._frozen["teacher"] = teacher
        self.build_networks(teacher, student if student is not None else teacher)

    def build_networks(self, teacher: nn.Module, student: nn.Module) -> None:
        """Add the distiller's own trained networks (`add_network`), e.g. a copy of `teacher`, and frozen
        ones (`add_frozen`), e.g. a copy of the starting `student`. Called once the teacher is loaded
        and the student initialised, before sharding and before a checkpoint is restored."""

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for net in self.frozen.values():  # they follow the module's device and dtype like the teacher
            net._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for net in self.frozen.values():
            net.eval()
        return self

    def begin_step(self, step: int) -> None:
        """Called by the training step with its global step (from 0) before the job is made: a method whose
        sampling follows training progress (a curriculum) records it, in a buffer if a resume needs it."""

    def updates(self, step: int) -> list[str]:
        """The networks updated at training step `step` (from 0), in order: "student" when
        step % student_every == 0, then each of `networks` whose Optimization is due."""
        return ((["student"] if step % self.student_every == 0 else [])
                + [name for name in self.networks if self.optimization[name].due(step)])

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

    def student_loss(self, student: nn.Module, job: DistillTargets) -> tuple[torch.Tensor, dict]:
        """The student's loss for this step's job; override to run the student several times or to feed
        its output to another network (gradients then reach only the student: the module keeps each
        update's gradients to the network it updates)."""
        return self.loss(student(job.z, job.timestep, job.cond), job)

    def held_out_loss(self, student: nn.Module, job: DistillTargets) -> torch.Tensor:
        """The number validation logs as val/loss (held-out clips, fixed draws) and a `Plateau` budget
        watches: by default the student's loss. A distiller whose loss value means little (DMD's) gives
        the quantity its training drives down instead."""
        return self.student_loss(student, job)[0]

    def network_loss(self, name: str, student: nn.Module, job: DistillTargets) -> tuple[torch.Tensor, dict]:
        """The loss of the distiller's own network `name` (self.networks[name]) for this step's job; the
        student is there to sample from (under no_grad: this update trains `name` only)."""
        raise NotImplementedError(f"{type(self).__name__} adds network {name!r}, so it defines network_loss for it")

    def update_loss(self, name: str, student: nn.Module, job: DistillTargets) -> tuple[torch.Tensor, dict]:
        """The loss of update `name` (one of `updates(step)`): the student's, or a network's of its own."""
        return self.student_loss(student, job) if name == "student" else self.network_loss(name, student, job)

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
    Subclasses call `guided_teacher(teacher, cond, generator)` in `make_targets` and take these
    arguments by forwarding `**kwargs` (so every one of them, ranges included, is theirs too):

        def __init__(self, my_arg: int = 3, **kwargs):
            super().__init__(**kwargs)
    """

    def __init__(self, *, mode: str = "balanced", ref_scale: float | tuple[float, float] = 2.5,
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

    def teacher_eps(self, cond: Conditions):
        """self.teacher's eps function (z, n) -> eps for conditions `guided_teacher` handed the student: the
        teacher on them as they are (balanced), or Eq 9 at the scales they carry (guided)."""
        if self.mode == "balanced":
            return self.eps_fn(self.teacher, cond)
        return self.eps_fn(self.teacher, cond, *cond.guidance.unbind(1))
