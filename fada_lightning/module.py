"""LightningModules: the shared avatar base and the teacher (Eq 1)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel

from .diffusion import schedule as S
from .diffusion.guidance import Conditions, condition_dropout
from .diffusion.sampling import generate_video
from .models.denoiser import AvatarDenoiser
from .presets import load_preset


def ema_with_warmup(decay: float):
    """EMA update for AveragedModel: decay_n = min(decay, (1 + n) / (10 + n)), so a short run's
    average is not dominated by its random initialisation."""

    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(_local(ema_params), _local(params), 1 - d)

    return update


def rng_states() -> dict:
    """The global random states training draws from (torch's, this process's CUDA device's, NumPy's,
    Python's) as plain lists, which every checkpoint format keeps. Only the current device: asking for
    every device's state would open a CUDA context on each GPU from each rank."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state().tolist(), "cuda": cuda,
            "numpy": [name, keys.tolist(), pos, has_gauss, gauss], "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    """Sets what `rng_states` returned (CUDA's on the current device, where one was saved and is here)."""
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s own random stream, mixed from the run's seed and the step it starts at by
    NumPy's SeedSequence, so no two (seed, rank, step) share a stream. A 32-bit value, as NumPy's global
    seed must be."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seeds the global generators `rng_states` keeps (torch's on every device, NumPy's, Python's)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]: a collective, so every rank calls it ([obj] outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def start_next_epoch(loops: dict) -> None:
    """A checkpoint's Lightning loop state (`checkpoint["loops"]`), saved between two epochs, made to resume at
    the next epoch's first batch. A fit that stops right after an epoch's last step (max_steps, SIGTERM) saves
    after the epoch has ended but before the next one zeroes its batch counts, and Lightning 2.6 resumes the
    next epoch with the finished one's count: it ends that epoch one batch in, or none, and the workers'
    unread shares are skipped. So the counts are zeroed here, as an epoch's start zeroes them."""
    fit = loops.get("fit_loop", {})
    epochs, batches = fit.get("epoch_progress", {}).get("current"), fit.get("epoch_loop.batch_progress")
    if epochs and batches and epochs["completed"] == epochs["ready"]:  # no epoch begun and not ended
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sharded tensors (FSDP2's DTensors) as this rank's shards: the EMA's shards and the student's are
    laid out alike, so the average is a local lerp, shard onto shard."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _instantiate(spec: dict):
    return instantiate_class((), spec)


class AvatarModule(L.LightningModule):
    """What every avatar model shares: preset -> (codec, audio features, net), batch encoding,
    the sampler, and a sample video at validation. Subclasses define `training_step`.
    activation_checkpointing: recompute the trained network's attention activations in backward
    (AvatarDenoiser.set_activation_checkpointing): for sd15 at 16 frames 7 GiB of activations instead of
    27 GiB (docs/scaling.md), for about one more forward a step."""

    hparams_ignore: tuple[str, ...] = ()  # constructor arguments that are modules, recorded another way
    checkpoint_role: str = "teacher"  # what its checkpoints are: "teacher" (a model trained on data) or "student"

    def __init__(self, preset: str | dict = "micro", prediction_type: str = "v_prediction",
                 schedule: dict | None = None, ema_decay: float | None = 0.999, clip_frames: int = 8,
                 motion_frames: int = 2, sample_steps: int = 25, ref_scale: float = 2.5, audio_scale: float = 6.5,
                 activation_checkpointing: bool = False):
        super().__init__()
        S.check_prediction_type(prediction_type)
        self.preset = load_preset(preset)
        self.schedule = dict(schedule or S.SD15_SCHEDULE)
        self.save_hyperparameters(ignore=self.hparams_ignore)
        # checkpoints carry the resolved values (a subclass may fill some of these in for its caller)
        self.hparams.update(preset=self.preset, schedule=self.schedule, prediction_type=prediction_type,
                            ema_decay=ema_decay, clip_frames=clip_frames, motion_frames=motion_frames,
                            sample_steps=sample_steps, ref_scale=ref_scale, audio_scale=audio_scale)
        self.codec = _instantiate(self.preset["codec"])
        self.audio_features = _instantiate(self.preset["audio_features"])
        audio = self.preset["net"]["audio"]
        if (self.audio_features.num_layers, self.audio_features.dim) != (audio["layers"], audio["dim"]):
            raise ValueError(
                f"preset {self.preset.get('name', '?')!r}: audio_features give (L, D) = "
                f"({self.audio_features.num_layers}, {self.audio_features.dim}), net.audio expects "
                f"({audio['layers']}, {audio['dim']})")
        self.net = AvatarDenoiser(**self.preset["net"], **self.net_options())
        self.net.set_activation_checkpointing(activation_checkpointing)
        if self.codec.latent_channels != self.net.denoising_net.config.in_channels:
            raise ValueError(f"preset {self.preset.get('name', '?')!r}: the codec makes {self.codec.latent_channels} "
                             f"latent channels, net.unet.in_channels is {self.net.denoising_net.config.in_channels}")
        self.ema = None
        if ema_decay:
            self.ema = AveragedModel(self.net, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self.register_buffer("alphas_cumprod", S.alphas_cumprod(self.schedule).float(), persistent=False)

    def net_options(self) -> dict:
        """AvatarDenoiser arguments besides the preset's (a student's CFG conditioning)."""
        return {}

    def networks(self) -> dict[str, AvatarDenoiser]:
        """The denoisers a sharding strategy shards, each on its own: the trained `net` and its EMA
        (fada_lightning/strategies.py)."""
        return {"net": self.net, **({"ema": self.ema.module} if self.ema is not None else {})}

    def configure_model(self):
        """Lightning's hook for sharding: a strategy with `parallelize(module)` (fada_lightning.strategies.FSDP2)
        shards the networks here, after `setup` and before the optimizer is made. Also called, without
        a Trainer, by `load_from_checkpoint`: nothing to shard then."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        parallelize = getattr(strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self)

    # ---- data -> latents --------------------------------------------------------------------
    def encode_batch(self, batch: dict) -> tuple[torch.Tensor, Conditions]:
        """Pixels in [-1, 1] -> z0 (B, F, C, h, w) and Conditions in latent space; a batch of `fada cache`'s
        latents (B, M + F + 1, C, h, w) = [motion, clip, reference] is already there."""
        if "latents" in batch:
            latents, f = batch["latents"], batch["audio"].shape[1]
            m = latents.shape[1] - f - 1
            return latents[:, m:m + f], Conditions(ref=latents[:, -1], motion=latents[:, :m], audio=batch["audio"])
        frames, motion, ref = batch["frames"], batch["motion"], batch["ref"]
        b, f, m = frames.shape[0], frames.shape[1], motion.shape[1]
        latents = self.codec.encode(torch.cat([frames, motion, ref[:, None]], 1).flatten(0, 1)).unflatten(0, (b, f + m + 1))
        return latents[:, :f], Conditions(ref=latents[:, -1], motion=latents[:, f:f + m], audio=batch["audio"])

    def abar(self, n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return S.expand_like(self.alphas_cumprod[n], like)

    # ---- sampling -------------------------------------------------------------------------
    @property
    def sampling_net(self) -> AvatarDenoiser:
        return self.ema.module if self.ema is not None else self.net

    def scheduler(self):
        return S.ddim_scheduler(self.hparams.prediction_type, self.schedule)

    @property
    def samples_with_cfg(self) -> bool:
        """True: Eq 9's three passes a step at (ref_scale, audio_scale); False: one conditional pass."""
        return True

    @property
    def sample_eta(self) -> float | None:
        """The eta (stochasticity) its scheduler's step is given by default; None: the scheduler's own."""
        return None

    def sampling_scales(self, ref_scale: float | None, audio_scale: float | None) -> tuple:
        """The (s_r, s_a) to sample with: the given ones, else the model's; (None, None) for a one-pass
        student that does not take scales."""
        if not self.samples_with_cfg and not self.sampling_net.takes_guidance:
            if ref_scale is not None or audio_scale is not None:
                raise ValueError(f"this {type(self).__name__} samples with one pass a step (its guidance is distilled "
                                 f"in); CFG scales do not apply to it")
            return None, None
        return (self.hparams.ref_scale if ref_scale is None else ref_scale,
                self.hparams.audio_scale if audio_scale is None else audio_scale)

    @torch.no_grad()
    def generate(self, ref: torch.Tensor, audio: torch.Tensor, steps: int | None = None,
                 ref_scale: float | None = None, audio_scale: float | None = None,
                 generator: torch.Generator | None = None, progress: bool = False, eta: float | None = None):
        """ref (B, 3, H, W) pixels, audio (B, T, W, L, D) -> (video (B, T, 3, H, W) in [-1, 1], NFE per window).
        eta: the scheduler step's stochasticity (TCD's gamma), default `sample_eta`."""
        ref_scale, audio_scale = self.sampling_scales(ref_scale, audio_scale)
        return generate_video(self.sampling_net, self.codec, self.scheduler(), ref, audio, self.hparams.clip_frames,
                              self.hparams.motion_frames, steps or self.hparams.sample_steps, ref_scale, audio_scale,
                              generator=generator, progress=progress, eta=self.sample_eta if eta is None else eta)

    # ---- Lightning hooks ------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            for net in (self.net, self.ema.module):  # an FSDP2 root keeps its own weights gathered after a
                if isinstance(net, FSDPModule):      # forward (strategies.FSDP2): back to shards, paired
                    net.reshard()
            self.ema.update_parameters(self.net)

    def log_data_health(self, batch: dict):
        """Corrupt samples skipped so far, summed over the workers of this rank."""
        if "skipped" in batch:
            seen = getattr(self, "_skipped_by_worker", {})
            for w, s in zip(batch["worker"].tolist(), batch["skipped"].tolist()):
                seen[w] = max(seen.get(w, 0), s)
            self._skipped_by_worker = seen
            self.log("data/skipped_samples", float(sum(seen.values())), reduce_fx="sum", sync_dist=True,
                     batch_size=len(batch["worker"]))

    def on_save_checkpoint(self, checkpoint: dict):
        checkpoint["fada_module"] = f"{type(self).__module__}.{type(self).__qualname__}"  # for `fada sample`
        checkpoint["fada_role"] = self.checkpoint_role  # checked wherever a checkpoint is read (checkpoints.py)
        start_next_epoch(checkpoint.get("loops", {}))
        by_rank = gather_objects(rng_states())  # every rank saves (Trainer.save_checkpoint), so all gather
        checkpoint["rng_states"] = by_rank[0]
        if len(by_rank) > 1:
            checkpoint["rng_states_by_rank"] = by_rank

    def on_train_start(self):
        """Each rank draws its own t, noise and condition dropout: `seed_everything` gives every rank the
        same state, so ranks > 0 reseed from (seed, rank) (`rank_seed`); rank 0 keeps it, so one process
        trains as it always did. A resumed run goes on with each rank's state as saved, so it trains as
        the run it continues would have; a rank the checkpoint has no state for (saved on fewer
        processes, or before states were kept by rank) reseeds from (seed, rank, step). Only a `fit` that
        resumes (`ckpt_path`) restores states: a module loaded to sample, or to train afresh, keeps the
        caller's state."""
        saved, self._resumed_rng_states = getattr(self, "_resumed_rng_states", None) or [], []
        saved = saved if self.trainer.ckpt_path else []
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if rank < len(saved):
            set_rng_states(saved[rank])
        elif rank > 0:
            seed_all(rank_seed(int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())), rank,
                               self.trainer.global_step))
        if saved and len(saved) != world:
            rank_zero_warn(f"the checkpoint kept random states for {len(saved)} process(es), this run has {world}: "
                           f"ranks without a saved state draw from new seeds, so the run does not continue the "
                           f"saved one's draws exactly", category=UserWarning)

    def on_load_checkpoint(self, checkpoint: dict):
        states = checkpoint.get("rng_states")
        self._resumed_rng_states = checkpoint.get("rng_states_by_rank") or ([states] if states else [])
        theirs = checkpoint.get("hyper_parameters", {}).get("preset")
        if isinstance(theirs, dict) and theirs.get("net") != self.preset.get("net"):
            raise ValueError(
                f"checkpoint was trained with preset {theirs.get('name', '?')!r}, this model is "
                f"{self.preset.get('name', '?')!r}: their network shapes differ")

    def held_out_loss(self, batch, batch_idx) -> torch.Tensor:
        """Loss at fixed t and fixed noise per batch index: comparable across evaluations."""
        z0, cond = self.encode_batch(batch)
        g = torch.Generator(device=z0.device).manual_seed(batch_idx)
        n = torch.linspace(50, 950, z0.shape[0], device=z0.device).long()
        eps = torch.randn(z0.shape, generator=g, device=z0.device)
        return self.diffusion_loss(self.net, z0, cond, n, eps).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.held_out_loss(batch, batch_idx), sync_dist=True, batch_size=len(batch["ref"]))
        if batch_idx == 0:
            self._log_sample_video(batch)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.held_out_loss(batch, batch_idx), sync_dist=True, batch_size=len(batch["ref"]))

    def predict_step(self, batch, batch_idx):
        """A batch's references and audio -> sampled clips (B, F, 3, H, W) in [-1, 1]."""
        g = torch.Generator(device=self.device).manual_seed(batch_idx)
        return self.generate(batch["ref"], batch["audio"], generator=g)[0]

    def _log_sample_video(self, batch):
        """Sample the first val clip from its reference and audio; log GT over sample as a filmstrip."""
        logger = self.logger
        if logger is None or not hasattr(logger.experiment, "add_image") or self.trainer.sanity_checking:
            return
        g = torch.Generator(device=self.device).manual_seed(0)
        video, nfe = self.generate(batch["ref"][:1], batch["audio"][:1], generator=g)
        strip = torch.cat([batch["frames"][0], video[0]], dim=-2)  # (F, 3, 2H, W): truth above sample
        strip = torch.cat(list(strip), dim=-1)  # (3, 2H, F W)
        logger.experiment.add_image("val/truth_over_sample", (strip + 1) / 2, self.global_step)
        self.log("val/nfe", float(nfe))
        out = Path(self.trainer.log_dir or ".") / "samples"
        out.mkdir(parents=True, exist_ok=True)
        from .video_io import write_mp4

        frames = ((video[0].permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
        write_mp4(out / f"step{self.global_step:07d}.mp4", frames, None)

    def diffusion_loss(self, net, z0, cond, n, eps) -> torch.Tensor:
        raise NotImplementedError


class TeacherModule(AvatarModule):
    """eps_phi trained with Eq 1, in the network's own parameterisation (eps or v), with
    SPEC's condition dropout and optional min-SNR-gamma weighting. Per-sample loss (B,)."""

    def __init__(self, preset: str | dict = "micro", prediction_type: str = "v_prediction",
                 min_snr_gamma: float | None = 5.0, p_drop_audio: float = 0.05, p_drop_ref_audio: float = 0.05,
                 p_drop_motion: float = 0.05, lr: float = 3e-4, weight_decay: float = 0.01, warmup_steps: int = 100,
                 schedule: dict | None = None, ema_decay: float | None = 0.999, clip_frames: int = 8,
                 motion_frames: int = 2, sample_steps: int = 25, ref_scale: float = 2.5, audio_scale: float = 6.5,
                 activation_checkpointing: bool = False):
        super().__init__(preset, prediction_type, schedule, ema_decay, clip_frames, motion_frames,
                         sample_steps, ref_scale, audio_scale, activation_checkpointing)

    def diffusion_loss(self, net, z0, cond, n, eps) -> torch.Tensor:
        abar = self.abar(n, z0)
        z_n = S.add_noise(z0, eps, abar)  # Eq 1
        target = S.from_eps(eps, z_n, abar, self.hparams.prediction_type)
        pred = net(z_n, n, cond)
        weight = S.min_snr_weight(self.alphas_cumprod[n], self.hparams.min_snr_gamma, self.hparams.prediction_type)
        return weight * (pred.float() - target).pow(2).flatten(1).mean(1)

    def training_step(self, batch, batch_idx):
        z0, cond = self.encode_batch(batch)
        cond = condition_dropout(cond, self.hparams.p_drop_audio, self.hparams.p_drop_ref_audio, self.hparams.p_drop_motion)
        n = torch.randint(0, len(self.alphas_cumprod), (z0.shape[0],), device=z0.device)
        loss = self.diffusion_loss(self.net, z0, cond, n, torch.randn_like(z0)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        self.log_data_health(batch)
        return loss

    def configure_optimizers(self):
        return adamw_with_warmup(self.net.parameters(), self.hparams.lr, self.hparams.weight_decay,
                                 self.hparams.warmup_steps)


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup_steps: int) -> dict:
    """AdamW with a linear learning-rate warm-up over `warmup_steps` optimizer steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
