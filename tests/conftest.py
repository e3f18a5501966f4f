"""Shared test helpers: tiny WebDataset shards written inside a test's tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from datamodules.synthetic import write_shards
from fada_lightning.presets import load_preset
from fada_lightning.video_io import encode_mp4, encode_wav

SAMPLES_PER_FRAME = 640


def small_preset() -> dict:
    """`micro` with a narrower UNet: the same code paths, a few times faster."""
    preset = load_preset("micro")
    preset["net"]["unet"]["block_out_channels"] = [32, 32, 64]
    preset["name"] = "micro-narrow"
    return preset


def make_shards(tmp_path, n_clips: int, clips_per_shard: int, frames: int = 20, size: int = 32) -> list[str]:
    """Synthetic strict shards (datamodules.synthetic, seed 0) -> sorted shard paths."""
    root = Path(tmp_path) / "synthetic"
    manifest = write_shards(root, strict_clips=n_clips, lenient_clips=0, clips_per_shard=clips_per_shard,
                            size=size, frames=frames, seed=0, progress=False, processes=1)
    return [str(root / p) for p in manifest["strict"]]


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
