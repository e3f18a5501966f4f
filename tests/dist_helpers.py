"""What the distributed tests (tests/test_distributed.py) run inside `fada fit` processes.

A run of 1 process with batch B and a run of P processes with batch B / P see the same clips a step
(`IndexedClips`: map-style, dealt in order by a DistributedSampler: clip i to rank i mod P) and
draw the same t, noise and dropout for each clip (`SeededDistill`: one generator per clip, seeded by
step and clip index), so their loss trajectories and weights agree up to float summation order.
The distiller they run (tests/test_distributed.py) trains a network of its own besides the student.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.audio_features import AudioFeatures
from datamodules.clips import ClipDecoder, FixedClips

from datamodules.shards import resolve_shards
from distillers.base import DistillTargets
from fada_lightning.distill import DistillModule
from fada_lightning.module import gather_objects, rng_states


class _Indexed(Dataset):
    def __init__(self, clips: FixedClips):
        self.clips = clips

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        return {**self.clips[i], "index": i}


class IndexedClips(L.LightningDataModule):
    """The first `count` clips of `shards`, in order, each with its index (fixed crops: rng=None). The clip
    shape, audio features and preset are the model's (`fada fit` links them, datamodules.streaming.model_settings)."""

    def __init__(self, shards: str, count: int = 8, batch_size: int = 4, clip_frames: int | None = None,
                 motion_frames: int | None = None, audio_features: AudioFeatures | None = None,
                 preset: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["audio_features", "preset", "clip_frames", "motion_frames"])
        self.decoder = ClipDecoder(audio_features, clip_frames, motion_frames, frame_size=preset["frame_size"])

    def setup(self, stage: str):
        self.clips = _Indexed(FixedClips(resolve_shards(self.hparams.shards), self.decoder, self.hparams.count))

    def train_dataloader(self):  # in order: rank r gets clips r, r + P, ... (Lightning's own sampler shuffles)
        """With a generator of its own: each epoch's iterator draws a base seed, and from the global generator
        that draw would land on different sides of a checkpoint saved at an epoch's end in a straight run
        and in one resumed from it (Lightning re-enters the saved epoch), so the module's draws would not
        line up."""
        sampler = DistributedSampler(self.clips, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(self.clips, batch_size=self.hparams.batch_size, sampler=sampler,
                          generator=torch.Generator().manual_seed(0))


class SeededDistill(DistillModule):
    """Training jobs with each clip's random draws seeded by (global step, clip index)."""

    def distillation_job(self, batch, generator=None) -> DistillTargets:
        if generator is not None:  # held out: seeded already
            return super().distillation_job(batch, generator)
        return DistillTargets.cat([
            super(SeededDistill, self).distillation_job({k: v[i:i + 1] for k, v in batch.items()},
                                                        torch.Generator().manual_seed(1000 * self.global_step + index))
            for i, index in enumerate(batch["index"].tolist())])


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls it: sharded tensors are gathered whole."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in module.state_dict().items()}


class Record(L.Callback):
    """Writes `out`/record.json ({losses: the student's mean over ranks per step, network_losses: {network:
    its loss per step it updated}, keys: [rank][step] clip keys, rng: [rank][step] a digest of the global
    random states at the step's start, dtypes: trained weights' dtypes}), `out`/weights.pt (the module's
    whole state at the end) and `out`/start.pt (at the start of training, after a checkpoint was
    restored) from rank 0."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.losses, self.keys, self.rng, self.network_losses = [], [], [], {}
        self.start = None

    def on_train_start(self, trainer, pl_module):
        self.start = full_state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rng.append(hashlib.sha256(json.dumps(rng_states()).encode()).hexdigest()[:16])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
        for name, loss in outputs.get("losses", {}).items():
            mean = float(trainer.strategy.reduce(loss, reduce_op="mean"))
            self.network_losses.setdefault(name, []).append(mean)
        self.keys.append(list(batch["key"]))

    def on_train_end(self, trainer, pl_module):
        state = full_state(pl_module)
        keys, rng = gather_objects(self.keys), gather_objects(self.rng)
        dtypes = sorted({str(p.dtype) for p in pl_module.net.parameters()})
        sharded = {name: isinstance(net, FSDPModule) for name, net in pl_module.networks().items()}
        if trainer.global_rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            record = dict(losses=self.losses, network_losses=self.network_losses, keys=keys, rng=rng, sharded=sharded, dtypes=dtypes, world_size=trainer.world_size,
                          global_step=trainer.global_step)
            (self.out / "record.json").write_text(json.dumps(record))
            torch.save(state, self.out / "weights.pt")
            torch.save(self.start, self.out / "start.pt")
