"""Shared test helpers: tiny WebDataset shards, a tiny trained teacher, CPU trainers and batches
(the ones a user's distiller tests need too live in fada_lightning/testing.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from fada_lightning.diffusion import schedule as S
from fada_lightning.testing import cpu_trainer, make_shards, random_batch, shard_data, small_preset  # noqa: F401
from fada_lightning.video_io import encode_mp4, encode_wav

SAMPLES_PER_FRAME = 640

if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per xdist worker: -n 2 on 2 cores, no oversubscription
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first: under xdist they then run beside each other and the short tests
    fill in around them, instead of one of them starting last while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order


def burst_clip(key: str, frames: int = 20, size: int = 32, burst_frame: int = 5, seed: int = 0) -> dict:
    """A sample whose content names its frames: frame i is flat grey level 20 + 10 i, the wav is
    quiet noise with a loud burst over exactly frame `burst_frame`'s 640 samples, and json
    mouth_open[i] = i / frames."""
    rng = np.random.default_rng(seed)
    video = np.broadcast_to((20 + 10 * np.arange(frames, dtype=np.uint8))[:, None, None, None],
                            (frames, size, size, 3)).copy()
    wav = (0.003 * rng.standard_normal(frames * SAMPLES_PER_FRAME)).astype(np.float32)
    burst = slice(burst_frame * SAMPLES_PER_FRAME, (burst_frame + 1) * SAMPLES_PER_FRAME)
    wav[burst] = 0.5 * rng.standard_normal(SAMPLES_PER_FRAME).clip(-1.9, 1.9)
    meta = {"frames": frames, "fps": 25, "tier": "strict", "burst_frame": burst_frame,
            "mouth_open": [i / frames for i in range(frames)]}
    return {"__key__": key, "mp4": encode_mp4(video), "wav": encode_wav(wav), "json": json.dumps(meta).encode()}


def frame_index(frames) -> np.ndarray:
    """Decoded (..., 3, H, W) in [-1, 1] of `burst_clip` -> the frame numbers they show."""
    grey = (frames.mean(dim=(-1, -2, -3)).numpy() + 1) * 127.5
    return np.round((grey - 20) / 10).astype(int)


def write_shard(path, samples: list[dict]) -> str:
    """Samples of bytes -> one tar (no encoding: values are bytes already)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


class ExactNet(torch.nn.Module):
    """An exact teacher for the latents z0 it is given: at DDPM index n it outputs the true eps (or v)
    of z_n, for every CFG pass. DDIM steps with it stay on the forward process of z0's noise."""

    def __init__(self, z0: torch.Tensor, prediction_type: str):
        super().__init__()
        self.z0, self.prediction_type, self.abar = z0, prediction_type, S.alphas_cumprod().float()

    def encode_reference(self, cond):
        return {}

    def forward(self, z, n, cond, reference=None):
        z0 = self.z0.repeat(z.shape[0] // self.z0.shape[0], *[1] * (z.ndim - 1))
        abar = S.expand_like(self.abar[torch.as_tensor(n).long().expand(z.shape[0])], z)
        return S.from_eps(S.x0_to_eps(z, z0, abar), z, abar, self.prediction_type)


class WobblyNet(torch.nn.Module):
    """A deterministic non-linear stand-in network that reads z, n and every condition."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain

    def encode_reference(self, cond):
        return {}

    def forward(self, z, n, cond, reference=None):
        n = torch.as_tensor(n, dtype=z.dtype).expand(z.shape[0]).reshape(-1, 1, 1, 1, 1)
        return (self.gain * torch.tanh(z) + torch.sin(n / 300) + 0.2 * cond.ref[:, None]
                + 0.1 * cond.audio.mean((2, 3, 4))[..., None, None, None] + 0.1 * cond.motion.mean(1, keepdim=True))


def random_latents(b: int = 5, seed: int = 0, size: int = 4):
    """(z0, Conditions, eps) of random latents: B clips of 3 frames, 6 channels, size x size."""
    from fada_lightning.diffusion.guidance import Conditions

    g = torch.Generator().manual_seed(seed)
    z0, eps = torch.randn(2, b, 3, 6, size, size, generator=g)
    cond = Conditions(ref=torch.randn(b, 6, size, size, generator=g),
                      motion=torch.randn(b, 2, 6, size, size, generator=g), audio=torch.randn(b, 3, 5, 1, 8, generator=g))
    return z0, cond, eps


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("distill"), n_clips=8, clips_per_shard=4, frames=16, size=32)


@pytest.fixture(scope="session")
def teacher_ckpt(shards, tmp_path_factory) -> str:
    """A narrow micro teacher trained for 60 steps on the synthetic shards: a real `fada fit` checkpoint."""
    from fada_lightning.module import TeacherModule

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = TeacherModule(preset=small_preset(), ema_decay=0.9, clip_frames=4, lr=2e-3, warmup_steps=5)
    trainer = cpu_trainer(root, 60, enable_checkpointing=False)
    trainer.fit(model, shard_data(shards, model))
    trainer.save_checkpoint(root / "teacher.ckpt")
    return str(root / "teacher.ckpt")
