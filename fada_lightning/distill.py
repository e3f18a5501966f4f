"""DistillModule: a frozen teacher, a trainable student and a pluggable distiller (SPEC section 3).

The teacher comes from a `fada fit` teacher checkpoint (its EMA weights when it has them). The
student (`net`, with optional EMA) starts as an exact copy. Everything method-specific lives in
the distiller (distillers/base.py); the training step below is the same for all of them: one job
of targets a step, then each network due (the student, and any the distiller trains of its own)
gets its loss, backward, clip and optimizer step in turn (Lightning's manual optimization).
A student checkpoint is self-contained for sampling: it carries the teacher's settings, the
distiller's config and the student's scheduler config, but not the teacher's weights; the
distiller's own networks are in it for resuming and left out when it is loaded to sample.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from distillers.base import Distiller, DistillTargets, Optimization

from .checkpoints import CheckpointError, check_role, read_checkpoint, read_metadata
from .models.denoiser import AvatarDenoiser
from .module import AvatarModule
from .presets import ConfigError, load_preset

HOW_TO_TRAIN_A_TEACHER = ("train one with `fada fit --config teacher.yaml` (its checkpoints land in "
                          "runs/teacher/tb/run/checkpoints/), then pass --model.init_args.teacher_ckpt PATH")
MUST_MATCH = ("preset", "prediction_type", "schedule")  # the student is the teacher's network, re-trained
FROM_TEACHER = (*MUST_MATCH, "clip_frames", "motion_frames", "ref_scale", "audio_scale")


def read_teacher_checkpoint(path: str | Path | None, weights: bool = True) -> dict:
    """The teacher checkpoint at `path` (a file or a sharded run's folder), checked to be a fada-lightning
    teacher's; `weights=False` reads its metadata only (hyper_parameters, global_step, role)."""
    if not path:
        raise ConfigError(f"no teacher checkpoint given (model.init_args.teacher_ckpt): {HOW_TO_TRAIN_A_TEACHER}")
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"teacher checkpoint {path} does not exist: {HOW_TO_TRAIN_A_TEACHER}")
    try:
        checkpoint = read_checkpoint(path) if weights else read_metadata(path, weights_only=True)
    except CheckpointError as err:
        raise CheckpointError(f"teacher checkpoint {err}: {HOW_TO_TRAIN_A_TEACHER}") from None
    except Exception as err:  # one holding arbitrary objects
        raise ConfigError(f"teacher checkpoint {path} cannot be read ({type(err).__name__}): {HOW_TO_TRAIN_A_TEACHER}") from err
    check_role(path, checkpoint, "teacher", f"model.init_args.teacher_ckpt names the teacher to distil; "
               f"{HOW_TO_TRAIN_A_TEACHER}")
    if not isinstance(checkpoint.get("hyper_parameters", {}).get("preset"), dict):
        raise ConfigError(f"{path} is not a fada-lightning teacher checkpoint (no resolved preset in its "
                         f"hyper_parameters): {HOW_TO_TRAIN_A_TEACHER}")
    return checkpoint


def teacher_weights(checkpoint: dict, path) -> dict[str, torch.Tensor]:
    """The network the teacher samples with: its EMA if it kept one, else its raw weights."""
    state = checkpoint.get("state_dict", {})
    for prefix in ("ema.module.", "net."):
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            return weights
    raise ConfigError(f"{path} holds no network weights ('ema.module.*' or 'net.*'): {HOW_TO_TRAIN_A_TEACHER}")


def _differences(theirs, ours, prefix: str = "") -> list[str]:
    """Where two nested config values differ, as 'key: teacher X, student Y' lines."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [line for k in sorted(theirs.keys() | ours.keys(), key=str)
                for line in _differences(theirs.get(k), ours.get(k), f"{prefix}{k}.")]
    return [] if theirs == ours else [f"{prefix.rstrip('.')}: teacher {theirs!r}, student {ours!r}"]


def check_weights_fit(net: torch.nn.Module, weights: dict, path) -> None:
    """One error naming the parameters of `weights` that `net` lacks, does not expect or shapes otherwise."""
    own = net.state_dict()
    problems = [f"missing {k}" for k in sorted(own.keys() - weights.keys())]
    problems += [f"unexpected {k}" for k in sorted(weights.keys() - own.keys())]
    problems += [f"{k}: teacher {tuple(weights[k].shape)}, student {tuple(own[k].shape)}"
                 for k in sorted(own.keys() & weights.keys()) if weights[k].shape != own[k].shape]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ConfigError(f"checkpoint {path} does not fit the student's network: "
                         + "; ".join(problems[:8]) + more)


def read_student_start(path: str | Path, hparams: dict) -> dict[str, torch.Tensor]:
    """The weights of the student checkpoint at `path` (an earlier stage's: its EMA if it kept one) to start
    a student from, checked to be a fada-lightning student of the same network: preset, prediction
    type, schedule and CFG conditioning equal to `hparams` (the new student's)."""
    hint = "model.init_args.student_ckpt names an earlier stage's student checkpoint (`fada fit` of a distiller)"
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"student checkpoint {path} does not exist: {hint}")
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"student checkpoint {err}: {hint}") from None
    check_role(path, checkpoint, "student", hint)
    theirs = dict(checkpoint.get("hyper_parameters", {}))
    if "distiller" not in theirs:
        raise ConfigError(f"{path} is not a fada-lightning student checkpoint (no distiller in its hyper_parameters): "
                          f"{hint}")
    theirs["preset"] = load_preset(theirs["preset"])
    problems = [line for key in (*MUST_MATCH, "cfg_conditioning", "cfg_tokens")
                for line in _differences(theirs.get(key), hparams[key], f"{key}.")]
    problems = [p.replace(": teacher ", ": checkpoint ") for p in problems if not p.startswith("preset.name:")]
    if problems:
        raise ConfigError(f"student checkpoint {path} does not fit this student: " + "; ".join(problems))
    return teacher_weights(checkpoint, path)


class DistillModule(AvatarModule):
    """Distils the teacher in `teacher_ckpt` into a student with `distiller`.

    preset, prediction_type, schedule, clip_frames, motion_frames, ref_scale and audio_scale
    default to the teacher's (None); the first three must equal the teacher's. sample_steps
    defaults to the distiller's; ref_scale and audio_scale are the scales the student samples with
    by default (for a student that takes them, the ones it is told).
    cfg_conditioning (models/cfg.py): how a one-pass student is told the CFG scales it imitates,
    "none", "time_embedding", "layer" or "layer_tokens" (FADA-Fast), with `cfg_tokens` tokens per
    set; the parts it adds start at zero output, the rest of the student is the teacher's.
    student_ckpt: start the student (and its EMA) from an earlier stage's student checkpoint instead of
    the teacher (TurboTalk's stage 2 from its DMD student), checked to be the same network. The teacher is
    loaded in `setup` (only training and evaluation need it): frozen, in eval mode, outside the
    optimizers and out of the checkpoints. The student's optimizer: AdamW at lr, betas, weight_decay,
    warmed up over warmup_steps, its gradient norm clipped to grad_clip (None: not clipped).
    """

    hparams_ignore = ("distiller",)  # recorded as its spec (class_path + init_args) instead
    checkpoint_role = "student"

    def __init__(self, teacher_ckpt: str | None, distiller: Distiller, lr: float = 1e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 50, ema_decay: float | None = 0.995, sample_steps: int | None = None,
                 preset: str | dict | None = None, prediction_type: str | None = None, schedule: dict | None = None,
                 clip_frames: int | None = None, motion_frames: int | None = None,
                 ref_scale: float | None = None, audio_scale: float | None = None,
                 cfg_conditioning: str = "none", cfg_tokens: int = 4, activation_checkpointing: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), grad_clip: float | None = None,
                 student_ckpt: str | None = None):
        if isinstance(distiller, dict):  # a checkpoint written outside LightningCLI holds the spec
            distiller = instantiate_class((), distiller)
        given = dict(preset=preset, prediction_type=prediction_type, schedule=schedule, clip_frames=clip_frames,
                     motion_frames=motion_frames, ref_scale=ref_scale, audio_scale=audio_scale)
        settings = self._teacher_settings(teacher_ckpt, given)
        super().__init__(settings["preset"], settings["prediction_type"], settings["schedule"], ema_decay,
                         settings["clip_frames"], settings["motion_frames"], sample_steps or distiller.sample_steps,
                         settings["ref_scale"], settings["audio_scale"], activation_checkpointing)
        self.hparams.update(teacher_ckpt=teacher_ckpt, distiller=distiller.spec())
        if self.net.takes_guidance and distiller.sample_cfg:
            raise ConfigError(f"cfg_conditioning {cfg_conditioning!r} tells a one-pass student its CFG scales, but "
                             f"{type(distiller).__name__} samples with Eq 9's three passes: set the distiller's "
                             f"mode: guided (and scale ranges to draw from), or cfg_conditioning: none")
        self.distiller = distiller
        self.distiller.bind(self.schedule, self.hparams.prediction_type,
                            self.ema.module if self.ema is not None else None)
        self._keep_teacher(None)
        self.automatic_optimization = False  # training_step steps each network's optimizer itself
        self._updated: list[str] = []  # the networks the last training step updated
        self._held_out_jobs: dict[int, tuple] = {}  # batch_idx -> (its clips, job), see held_out_job

    # The teacher follows the module's device and dtype (`_apply`) but is not one of its submodules:
    # strategies never wrap it with the trainable weights (DDP does not broadcast it, FSDP shards it
    # on its own, see `networks`), and checkpoints never hold it.
    def _keep_teacher(self, net: AvatarDenoiser | None):
        self.__dict__["teacher"] = net  # `self.teacher = net` would register it as a submodule

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        self._held_out_jobs = {}  # made on another device or in another dtype
        return self

    def networks(self) -> dict[str, nn.Module]:
        """The networks a sharding strategy shards, each on its own: the student and its EMA, the teacher
        and the distiller's own networks, trained and frozen."""
        return {**super().networks(), **({"teacher": self.teacher} if self.teacher is not None else {}),
                **{f"distiller.{name}": net for name, net in self.distiller.networks.items()},
                **{f"distiller.frozen.{name}": net for name, net in self.distiller.frozen.items()}}

    def trained_networks(self) -> dict[str, tuple[nn.Module, Optimization]]:
        """name -> (network, how it is updated): the student first, then the distiller's own."""
        student = Optimization(lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay,
                               grad_clip=self.hparams.grad_clip, warmup_steps=self.hparams.warmup_steps,
                               every=self.distiller.student_every)
        return {"student": (self.net, student),
                **{name: (net, self.distiller.optimization[name]) for name, net in self.distiller.networks.items()}}

    @staticmethod
    def _teacher_settings(teacher_ckpt, given: dict) -> dict:
        """Fill the settings not given from the teacher's checkpoint and check the given ones fit it.
        A student checkpoint away from its teacher has them all: it can sample, not train."""
        if all(v is not None for v in given.values()) and not (teacher_ckpt and Path(teacher_ckpt).expanduser().exists()):
            return given
        path = Path(teacher_ckpt or "").expanduser()
        theirs = read_teacher_checkpoint(teacher_ckpt, weights=False)["hyper_parameters"]
        ours = dict(given, preset=load_preset(given["preset"]) if given["preset"] is not None else None)
        problems = [line for key in MUST_MATCH if ours[key] is not None
                    for line in _differences(theirs.get(key), ours[key], f"{key}.")]
        problems = [p for p in problems if not p.startswith("preset.name:")]
        if problems:
            raise ConfigError(f"teacher checkpoint {path} (preset {theirs['preset'].get('name', '?')!r}) does not fit "
                             f"the student (preset {(ours['preset'] or {}).get('name', '?')!r}): " + "; ".join(problems))
        return {k: theirs.get(k) if given[k] is None else given[k] for k in FROM_TEACHER}

    def net_options(self) -> dict:
        return {"cfg_conditioning": self.hparams.cfg_conditioning, "cfg_tokens": self.hparams.cfg_tokens}

    # ---- the teacher -----------------------------------------------------------------------
    def setup(self, stage: str):
        if stage == "predict":  # sampling needs no teacher and none of the distiller's own networks
            return
        self.load_teacher()  # fit, validate and test compute distillation losses
        strategy = self._trainer.strategy if self._trainer is not None else None
        if self.distiller.networks and isinstance(strategy, DDPStrategy):
            # networks that sit out some steps' backward passes: DDP must look for them each time
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def load_teacher(self):
        """Build the frozen teacher from its checkpoint and start the student (and its EMA) as a copy, or
        from `student_ckpt`. Runs in `setup`, before a Trainer restores a checkpoint (which then brings
        the trained student)."""
        if self.teacher is not None:
            return
        path = self.hparams.teacher_ckpt
        checkpoint = read_teacher_checkpoint(path)
        weights = teacher_weights(checkpoint, path)
        if self._trainer is not None and self.trainer.is_global_zero:  # which teacher, in the run's log
            saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(path).expanduser().stat().st_mtime))
            print(f"[fada] teacher: {Path(path).expanduser().resolve()} (step {checkpoint.get('global_step', '?')}, "
                  f"saved {saved})")
        teacher = AvatarDenoiser(**self.preset["net"])
        check_weights_fit(teacher, weights, path)
        teacher.load_state_dict(weights)
        self._keep_teacher(teacher.requires_grad_(False).eval())
        # a resumed run then restores the trained student over this; the student's CFG conditioning
        # parts (if any) are new and keep their zero-output initialisation
        for student in (self.net, self.ema.module if self.ema is not None else None):
            if student is not None:
                student.load_state_dict(weights, strict=False)
        if self.hparams.student_ckpt:
            start = read_student_start(self.hparams.student_ckpt, {**self.hparams, "preset": self.preset})
            check_weights_fit(self.net, start, self.hparams.student_ckpt)
            for student in (self.net, self.ema.module if self.ema is not None else None):
                if student is not None:
                    student.load_state_dict(start)
        self.distiller.set_teacher(teacher, self.net)
        self.distiller.to(device=self.device)  # its own networks, built on the CPU
        self._held_out_jobs = {}  # made by another teacher

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.teacher, self.ema):  # they compute targets and samples, never train
            if frozen is not None:
                frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict):
        super().on_save_checkpoint(checkpoint)
        checkpoint["scheduler_config"] = dict(self.scheduler().config)

    def on_load_checkpoint(self, checkpoint: dict):
        super().on_load_checkpoint(checkpoint)
        if not self.distiller.networks:  # loaded to sample: the distiller's own networks stay on disk
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("distiller.networks.")]:
                del state[key]

    # ---- the loop --------------------------------------------------------------------------
    def distillation_job(self, batch: dict, generator: torch.Generator | None = None) -> DistillTargets:
        """Steps 1 and 2 of the loop (distillers/base.py): t, noise and the frozen networks' targets."""
        if self.teacher is None:
            raise RuntimeError("DistillModule has no teacher: a Trainer loads it in `setup`, or call load_teacher()")
        z0, cond = self.encode_batch(batch)
        t = self.distiller.sample_time(z0.shape[0], z0.device, generator)
        eps = torch.randn(z0.shape, generator=generator, device=generator.device if generator else z0.device)
        # no_grad, not inference_mode: the student's backward may save the targets, and a sharded
        # teacher's unsharding keeps version counters, which inference tensors do not have
        with torch.no_grad():
            return self.distiller.make_targets(self.teacher, z0, cond, t, eps.to(z0), generator, batch.get("tier"))

    def distillation_loss(self, batch: dict, generator: torch.Generator | None = None):
        """The student's loss on a batch -> (loss, {name: value to log})."""
        return self.distiller.student_loss(self.net, self.distillation_job(batch, generator))

    def training_step(self, batch, batch_idx):
        """Each network due this step, in turn: its loss on this step's job, backward, clip, step."""
        b = len(batch["audio"])
        self.distiller.begin_step(self.global_step)
        job = self.distillation_job(batch)
        self._updated = self.distiller.updates(self.global_step)
        if not self._updated:
            raise RuntimeError(f"{type(self.distiller).__name__}.updates({self.global_step}) is empty: every "
                               f"training step must update some network")
        trained = self.trained_networks()
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()  # one each, or lists
        optimizers = dict(zip(trained, optimizers if isinstance(optimizers, list) else [optimizers]))
        schedulers = dict(zip(trained, schedulers if isinstance(schedulers, list) else [schedulers]))
        losses = {}
        for i, name in enumerate(self._updated):
            net, optimization = trained[name]
            loss, logs = self.distiller.update_loss(name, self.net, job)
            optimizers[name].zero_grad(set_to_none=True)
            self.manual_backward(loss)
            for other, (other_net, _) in trained.items():  # only this update's gradients, only on this network
                if other != name:
                    other_net.zero_grad(set_to_none=True)
            norm = torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None],
                                                  optimization.grad_clip or math.inf)
            if i == len(self._updated) - 1:
                optimizers[name].step()  # Lightning's step: counts one global step per training step
            else:
                self.trainer.strategy.optimizer_step(optimizers[name].optimizer, closure=lambda: None, model=self)
            schedulers[name].step()
            losses[name] = loss.detach()
            self.log("train/loss" if name == "student" else f"train/{name}_loss", loss.detach(),
                     prog_bar=name == "student", batch_size=b)
            self.log(f"train/grad_norm/{name}", norm.full_tensor() if isinstance(norm, DTensor) else norm, batch_size=b)
            for key, value in logs.items():
                self.log_value(f"train/{key}", value, b)
        self.log_data_health(batch)
        return {"loss": losses.get("student", next(iter(losses.values()))), "losses": losses}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if "student" in self._updated:  # the EMA averages the student's updates, not the steps it sat out
            super().on_train_batch_end(outputs, batch, batch_idx)

    def log_value(self, name: str, value: torch.Tensor, batch_size: int):
        """A scalar as a metric; per-sample values (n,) as their mean and, on logging steps, a histogram."""
        if value.ndim == 0:
            self.log(name, value, batch_size=batch_size)
            return
        self.log(f"{name}_mean", value.float().mean(), batch_size=batch_size)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_histogram") and self.global_step % self.trainer.log_every_n_steps == 0:
            experiment.add_histogram(name, value.detach().float().cpu(), self.global_step)

    def held_out_loss(self, batch, batch_idx) -> torch.Tensor:
        """The distiller's held-out loss (`Distiller.held_out_loss`) at fixed t, noise and dropout per batch
        index, of the network that samples (the EMA where there is one): the model a plateau stops on and
        a table evaluates."""
        return self.distiller.held_out_loss(self.sampling_net, self.held_out_job(batch, batch_idx))

    HELD_OUT_JOBS_KEPT = 64  # held-out batches whose job is kept (budgets/plateau.yaml validates 8)

    def held_out_job(self, batch: dict, batch_idx: int) -> DistillTargets:
        """The job of a held-out batch, its draws seeded by batch_idx. A distiller with `fixed_targets`
        (its targets need only the batch, the draws and the frozen networks) has each batch's job made
        once and reused while batch_idx holds the same clips (their keys and start frames)."""
        clips = (tuple(batch["key"]), tuple(torch.as_tensor(batch["start"]).tolist())) if "key" in batch else None
        kept = self._held_out_jobs.get(batch_idx)
        if kept is not None and clips is not None and kept[0] == clips:
            return kept[1]
        job = self.distillation_job(batch, torch.Generator(device=self.device).manual_seed(batch_idx))
        if self.distiller.fixed_targets and clips is not None:
            if len(self._held_out_jobs) >= self.HELD_OUT_JOBS_KEPT:
                self._held_out_jobs.pop(next(iter(self._held_out_jobs)))
            self._held_out_jobs[batch_idx] = (clips, job)
        return job

    # ---- sampling --------------------------------------------------------------------------
    def scheduler(self):
        return self.distiller.scheduler()

    @property
    def samples_with_cfg(self) -> bool:
        return self.distiller.sample_cfg

    @property
    def sample_eta(self) -> float | None:
        return self.distiller.sample_eta

    def configure_optimizers(self):
        """One AdamW and one warm-up schedule per trained network (`trained_networks`), in that order."""
        configs = []
        for name, (net, o) in self.trained_networks().items():
            optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
            warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k, w=o.warmup_steps: min(1.0, (k + 1) / max(1, w)))
            configs.append({"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "name": f"lr/{name}"}})
        return configs
