"""The synthetic world's own evaluation network, so every metric is honest at micro scale.

`WorldNet` is a small CNN trained once (cached by seed and frame size) to read the renderer's
per-frame ground truth back from pixels: mouth opening, blink, head pose (dx, dy, angle) and the
lenient tier's degradations (blur sigma, noise std). Its penultimate layer stands in for Inception
(FID) and, pooled over time, for a video network (FVD); its predicted mouth opening and blink are
the expression parameters (E-FID); its predicted degradations give a no-reference quality (IQA);
its predicted mouth opening against the audio's loudness gives Sync-D / Sync-C (metrics/sync.py).
Held-out accuracy is measured when it is trained and recorded with it (`world_net(...).accuracy`).
"""
from __future__ import annotations

import fcntl
import functools
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from datamodules.synthetic import PEAK_FRAME_RMS, SAMPLES_PER_FRAME, render_clip
from fada_lightning.video_io import write_atomic

from .sync import sync_scores

# Ground truth per frame, each scaled to about [0, 1] or [-1, 1] by the renderer's ranges.
TARGETS = ("mouth_open", "blink", "pose_dx", "pose_dy", "pose_angle", "blur_sigma", "noise_std")
TRAIN_SEED_OFFSET, HELD_OUT_SEED_OFFSET = 7000, 8000  # far from training (0), validation (1000), test (2000)


def frame_targets(meta: dict) -> np.ndarray:
    """A rendered clip's json -> (T, 7) targets in TARGETS order."""
    size, quality = meta["size"], meta["quality"]
    pose = np.asarray(meta["head_pose"], dtype=np.float32)  # (T, 3): dx, dy pixels, angle degrees
    t = len(pose)
    return np.stack([np.asarray(meta["mouth_open"]), np.asarray(meta["blink"]),
                     pose[:, 0] / (0.16 * size), pose[:, 1] / (0.112 * size), pose[:, 2] / 20,
                     np.full(t, quality["blur_sigma"] / (2 * size / 64)), np.full(t, quality["noise_std"] / 14)],
                    axis=1).astype(np.float32)


def render_frames(seed: int, clips: int, size: int, frames: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Half strict, half lenient clips of `seed` -> frames (N, 3, size, size) in [-1, 1], targets (N, 7)."""
    images, targets = [], []
    for i in range(clips):
        video, _, meta = render_clip(seed, ("strict", "lenient")[i % 2], i // 2, size=size, frames=frames)
        images.append(torch.from_numpy(video).permute(0, 3, 1, 2).float().div(127.5).sub(1))
        targets.append(torch.from_numpy(frame_targets(meta)))
    return torch.cat(images), torch.cat(targets)


def degrade(x: torch.Tensor, y: torch.Tensor, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh degradations for clean frames, drawn as the lenient tier draws them (each w.p. 0.4: blur
    sigma ~ U(0.8, 2.0) size / 64 px with edge padding, then noise std ~ U(4, 14) levels, then 8-bit
    rounding), so blur and noise are seen on every identity, not only on the lenient clips'.
    x (B, 3, s, s) in [-1, 1], y (B, 7) -> both, targets updated."""
    b = len(x)
    clean = (y[:, 5] == 0) & (y[:, 6] == 0)
    blur = clean & (torch.rand(b, generator=g) < 0.4)
    noisy = clean & (torch.rand(b, generator=g) < 0.4)
    sigma = torch.empty(b).uniform_(0.8, 2.0, generator=g) * size / 64
    std = torch.empty(b).uniform_(4, 14, generator=g)
    if blur.any():
        s = sigma[blur]
        radius = int(torch.ceil(3 * s.max()))
        k = torch.arange(-radius, radius + 1.0)
        kernel = torch.exp(-0.5 * (k / s[:, None]) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (n 3, K)
        img = x[blur].reshape(1, -1, size, size)  # channels of every blurred frame as groups
        for weight, pad in ((kernel[:, None, :, None], (0, 0, radius, radius)), (kernel[:, None, None, :], (radius, radius, 0, 0))):
            img = F.conv2d(F.pad(img, pad, mode="replicate"), weight, groups=img.shape[1])
        x[blur] = img.reshape(-1, 3, size, size)
        y[blur, 5] = s / (2 * size / 64)
    x = torch.where(noisy[:, None, None, None], x + std[:, None, None, None] / 127.5 * torch.randn(x.shape, generator=g), x)
    y[noisy, 6] = std[noisy] / 14
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1, y


class WorldNet(nn.Module):
    """frames (N, 3, s, s) in [-1, 1] -> (features (N, feature_dim), predicted targets (N, 7))."""

    def __init__(self, size: int = 32, width: int = 16, feature_dim: int = 64):
        super().__init__()
        if size % 8:
            raise ValueError(f"WorldNet needs a frame size divisible by 8, got {size}")
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 2 * w, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, 2, 1), nn.SiLU(), nn.Flatten(),
            nn.Linear(4 * w * (size // 8) ** 2, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, len(TARGETS))
        self.size = size
        self.accuracy: dict = {}

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if frames.shape[-1] != self.size:
            frames = F.interpolate(frames, size=(self.size, self.size), mode="bilinear", align_corners=False)
        features = self.body(frames)
        return features, self.head(features)


def held_out_accuracy(net: WorldNet, frames: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per target: mean absolute error (in TARGETS' scaled units) and R^2 on held-out frames."""
    with torch.no_grad():
        pred = torch.cat([net(chunk)[1] for chunk in frames.split(512)])
    error = pred - targets
    r2 = 1 - error.square().mean(0) / targets.var(0, unbiased=False).clamp(min=1e-12)
    return {name: {"mae": round(float(error[:, i].abs().mean()), 4), "r2": round(float(r2[i]), 4)}
            for i, name in enumerate(TARGETS)}


def train_world_net(seed: int = 0, size: int = 32, clips: int = 400, steps: int = 2000, batch_size: int = 128,
                    progress: bool = True) -> WorldNet:
    """Fit WorldNet on `clips` rendered clips (seed + 7000), measure it on 100 others (seed + 8000)."""
    torch.manual_seed(seed)
    frames, targets = render_frames(seed + TRAIN_SEED_OFFSET, clips, size)
    net = WorldNet(size)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    decay = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=f"training the synthetic world's evaluation net ({size} px)", disable=not progress):
        pick = torch.randint(len(frames), (batch_size,), generator=g)
        x, y = degrade(frames[pick], targets[pick].clone(), size, g)
        mirror = torch.rand(batch_size, generator=g) < 0.5
        x[mirror] = x[mirror].flip(-1)
        y[mirror, 2] *= -1  # a mirrored head moves (dx) and turns (angle) the other way
        y[mirror, 4] *= -1
        loss = F.mse_loss(net(x)[1], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    net.eval().requires_grad_(False)
    net.accuracy = held_out_accuracy(net, *render_frames(seed + HELD_OUT_SEED_OFFSET, 100, size))
    return net


def world_net_path(seed: int, size: int, cache: str) -> Path:
    return Path(cache) / f"world_net-seed{seed}-{size}px.pt"


@functools.lru_cache(maxsize=None)
def world_net(seed: int = 0, size: int = 32, cache: str = "data/extractors") -> WorldNet:
    """The trained WorldNet for (seed, size), from `cache` or trained there once (~100 s)."""
    path = world_net_path(seed, size, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # one trainer at a time (test workers, ablation jobs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            began = time.perf_counter()
            net = train_world_net(seed, size)
            buffer = io.BytesIO()
            torch.save({"state_dict": net.state_dict(), "size": size, "seed": seed, "accuracy": net.accuracy}, buffer)
            write_atomic(path, buffer.getvalue())
            print(f"[fada] trained {path} in {time.perf_counter() - began:.0f} s; held-out accuracy: "
                  f"{json.dumps(net.accuracy)}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = WorldNet(saved["size"])
    net.load_state_dict(saved["state_dict"])
    net.accuracy = saved["accuracy"]
    return net.eval().requires_grad_(False)


class _WorldRole(nn.Module):
    """One metric's view of the shared WorldNet of (seed, size)."""

    role = ""

    def __init__(self, seed: int = 0, size: int = 32, cache: str = "data/extractors"):
        super().__init__()
        self.net = world_net(seed, size, cache)
        self.describe = {"extractor": "synthetic-world WorldNet", "role": self.role, "seed": seed,
                         "input": f"frames at {size}x{size}", "weights": str(world_net_path(seed, size, cache))}

    @torch.no_grad()
    def predict(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, T, 3, H, W) -> features (B, T, D), targets (B, T, 7)."""
        features, targets = self.net(video.flatten(0, 1).float())
        return features.unflatten(0, video.shape[:2]), targets.unflatten(0, video.shape[:2])


class WorldFrames(_WorldRole):
    """FID: per-frame features (B T, 64)."""
    role = "frame features"

    def forward(self, video):
        return self.predict(video)[0].flatten(0, 1)


class WorldVideo(_WorldRole):
    """FVD: per clip, [mean_t f_t ; mean_t |f_(t+1) - f_t|] (B, 128): appearance and motion."""
    role = "video features: mean and mean absolute change of frame features"

    def forward(self, video):
        f = self.predict(video)[0]
        return torch.cat([f.mean(1), (f[:, 1:] - f[:, :-1]).abs().mean(1)], dim=-1)


class WorldExpression(_WorldRole):
    """E-FID: predicted (mouth opening, blink) per frame (B T, 2)."""
    role = "expression: mouth opening, blink"

    def forward(self, video):
        return self.predict(video)[1][..., :2].flatten(0, 1)


class WorldQuality(_WorldRole):
    """IQA: 1 - (predicted blur + predicted noise) / 2, each scaled so the lenient tier's worst is 1:
    1 for a clean frame, lower as it looks blurred or noisy. Per frame (B T,)."""
    role = "quality: 1 - (blur + noise) / 2, predicted"

    def forward(self, video):
        degradation = self.predict(video)[1][..., 5:7].clamp(0, 1).mean(-1)
        return (1 - degradation).flatten(0, 1)


class WorldSync(_WorldRole):
    """Sync-D / Sync-C with SyncNet's scoring: 5-frame windows of the predicted mouth opening against
    5-frame windows of the audio's loudness mapped as the renderer maps it (frame RMS / peak, clipped
    to [0, 1]); offsets within +-vshift frames. Distances are in mouth-opening units."""
    role = "sync: predicted mouth opening vs loudness"

    def __init__(self, seed: int = 0, size: int = 32, cache: str = "data/extractors", vshift: int = 4,
                 window: int = 5):
        super().__init__(seed, size, cache)
        self.vshift, self.window = vshift, window
        self.describe.update(vshift=vshift, window=window)

    def forward(self, video: torch.Tensor, wav: torch.Tensor) -> list[dict[str, float]]:
        mouth = self.predict(video)[1][..., 0]  # (B, T)
        frames = min(mouth.shape[1], wav.shape[1] // SAMPLES_PER_FRAME)
        loud = wav[:, :frames * SAMPLES_PER_FRAME].float().unflatten(1, (frames, -1)).square().mean(-1).sqrt()
        heard = (loud / PEAK_FRAME_RMS).clamp(0, 1)  # (B, T)
        seen_windows = mouth[:, :frames].unfold(1, self.window, 1)  # (B, T - window + 1, window)
        heard_windows = heard.unfold(1, self.window, 1)
        return [sync_scores(v, a, self.vshift) for v, a in zip(seen_windows, heard_windows)]


def colour_histograms(frames: np.ndarray, bins: int = 4) -> np.ndarray:
    """frames (N, H, W, 3) uint8 -> (N, bins^3) joint RGB histograms, each summing to 1."""
    q = np.asarray(frames).astype(np.int64) * bins // 256
    index = ((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).reshape(len(q), -1)
    counts = np.stack([np.bincount(row, minlength=bins**3) for row in index]).astype(np.float64)
    return counts / counts.sum(1, keepdims=True)


def identity_distance(frames: np.ndarray, reference: np.ndarray, bins: int = 4) -> np.ndarray:
    """frames (N, H, W, 3), reference (H, W, 3) uint8 -> (N,) total variation distance in [0, 1] between
    each frame's joint RGB histogram (4 levels a channel) and the reference's. The world's identities
    differ by their palette (skin, hair, iris, shirt, background) far more than by anything a face does:
    on its test clips a person's frames sit 0.01-0.04 from their first frame (pose, blink, mouth), other
    people 0.48-0.71 on average; pixel noise of std 10 levels adds 0.09 (IQA is the measure for that)."""
    return 0.5 * np.abs(colour_histograms(frames, bins) - colour_histograms(np.asarray(reference)[None], bins)).sum(1)
