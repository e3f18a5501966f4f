"""Sync-D / Sync-C: audio-visual sync as syncnet_python (Chung & Zisserman 2016) computes it.

Any pair of per-frame embeddings can be scored: SyncNet's lip and audio embeddings at real scale
(`SyncNetScorer`, local weights), the synthetic world's mouth opening and loudness at micro scale
(`metrics.synthetic.WorldSync`). Both go through `sync_scores`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .extractors import load_state_dict, to_uint8

SAMPLE_RATE, FPS = 16000, 25


def sync_distances(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int) -> torch.Tensor:
    """video_emb, audio_emb (N, D) -> dists (N, 2 vshift + 1): dists[i, k] = ||v_i - a_(i + k - vshift) + 1e-6||,
    with a = 0 outside [0, N) (syncnet_python's calc_pdist, including pairwise_distance's eps)."""
    padded = F.pad(audio_emb, (0, 0, vshift, vshift))
    windows = padded.unfold(0, 2 * vshift + 1, 1)  # (N, D, 2 vshift + 1)
    return torch.linalg.vector_norm(video_emb[:, :, None] - windows + 1e-6, dim=1)


def sync_scores(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int) -> dict[str, float]:
    """One clip -> {"sync_d": min over offsets of the mean distance, "sync_c": median - min,
    "offset": vshift - argmin} (audio k frames late against the video gives offset -k)."""
    mean_dist = sync_distances(video_emb, audio_emb, vshift).mean(0)  # (2 vshift + 1,)
    min_dist, best = mean_dist.min(0)
    return {"sync_d": float(min_dist), "sync_c": float(mean_dist.median() - min_dist), "offset": vshift - int(best)}


# ---- python_speech_features.mfcc, vectorised in torch (its defaults, which SyncNet was trained on) ----
def _hz_to_mel(hz):
    return 2595 * math.log10(1 + hz / 700) if isinstance(hz, float) else 2595 * torch.log10(1 + hz / 700)


def _mel_filterbank(nfilt: int = 26, nfft: int = 512, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(nfilt, nfft // 2 + 1) triangles between FFT bins floor((nfft + 1) mel^-1(m_j) / sr), m_j evenly
    spaced on the mel scale from 0 to sr / 2."""
    mels = torch.linspace(0, _hz_to_mel(sample_rate / 2), nfilt + 2, dtype=torch.float64)
    bins = torch.floor((nfft + 1) * 700 * (10 ** (mels / 2595) - 1) / sample_rate)
    i = torch.arange(nfft // 2 + 1, dtype=torch.float64)
    left, centre, right = bins[:-2, None], bins[1:-1, None], bins[2:, None]
    rising = ((i - left) / (centre - left)).where((i >= left) & (i < centre), 0)
    falling = ((right - i) / (right - centre)).where((i >= centre) & (i < right), 0)
    return rising + falling


def mfcc(signal: torch.Tensor, sample_rate: int = SAMPLE_RATE, numcep: int = 13, nfilt: int = 26, nfft: int = 512,
         preemph: float = 0.97, ceplifter: int = 22) -> torch.Tensor:
    """signal (S,) -> (frames, numcep) float64, 25 ms rectangular frames every 10 ms, equal to
    python_speech_features.mfcc with its defaults (tested against it)."""
    x = signal.double()
    x = torch.cat([x[:1], x[1:] - preemph * x[:-1]])
    length, step = round(0.025 * sample_rate), round(0.01 * sample_rate)
    count = 1 if len(x) <= length else 1 + math.ceil((len(x) - length) / step)
    x = F.pad(x, (0, (count - 1) * step + length - len(x)))
    frames = x.unfold(0, length, step)  # (count, length)
    power = torch.fft.rfft(frames, nfft).abs().square() / nfft
    tiny = torch.finfo(torch.float64).eps
    energy = power.sum(1)
    bands = power @ _mel_filterbank(nfilt, nfft, sample_rate).T
    log_bands = torch.where(bands == 0, tiny, bands).log()
    n = torch.arange(nfilt, dtype=torch.float64)
    k = torch.arange(numcep, dtype=torch.float64)[:, None]
    dct = torch.cos(math.pi * k * (2 * n + 1) / (2 * nfilt)) * math.sqrt(2 / nfilt)  # DCT-II, orthonormal
    dct[0] /= math.sqrt(2)
    cepstra = log_bands @ dct.T * (1 + ceplifter / 2 * torch.sin(math.pi * k.T / ceplifter))
    cepstra[:, 0] = torch.where(energy == 0, tiny, energy).log()
    return cepstra


# ---- the SyncNet "S" network of syncnet_python (layer names and order match its weight file) ----------
def _conv_block(conv: nn.Module, bn: type, channels: int, pool: nn.Module | None = None) -> list[nn.Module]:
    return [conv, bn(channels), nn.ReLU(inplace=True)] + ([pool] if pool is not None else [])


class SyncNet(nn.Module):
    """Audio: MFCC (N, 1, 13, 20) (0.2 s); lips: frames (N, 3, 5, 224, 224) BGR in 0..255 -> (N, 1024) each."""

    def __init__(self, embed_dim: int = 1024):
        super().__init__()
        c2, b2, c3, b3 = nn.Conv2d, nn.BatchNorm2d, nn.Conv3d, nn.BatchNorm3d
        self.netcnnaud = nn.Sequential(
            *_conv_block(c2(1, 64, 3, padding=1), b2, 64, nn.MaxPool2d(1, 1)),
            *_conv_block(c2(64, 192, 3, padding=1), b2, 192, nn.MaxPool2d(3, (1, 2))),
            *_conv_block(c2(192, 384, 3, padding=1), b2, 384),
            *_conv_block(c2(384, 256, 3, padding=1), b2, 256),
            *_conv_block(c2(256, 256, 3, padding=1), b2, 256, nn.MaxPool2d(3, 2)),
            *_conv_block(c2(256, 512, (5, 4)), b2, 512))
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        self.netcnnlip = nn.Sequential(
            *_conv_block(c3(3, 96, (5, 7, 7), (1, 2, 2)), b3, 96, nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_conv_block(c3(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), b3, 256,
                         nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))),
            *_conv_block(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), b3, 256),
            *_conv_block(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), b3, 256),
            *_conv_block(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), b3, 256, nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_conv_block(c3(256, 512, (1, 6, 6)), b3, 512))

    def forward_aud(self, mfcc_windows: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc_windows).flatten(1))

    def forward_lip(self, frame_windows: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(frame_windows).flatten(1))


class SyncNetScorer(nn.Module):
    """Sync-D / Sync-C of generated clips against their audio with SyncNet weights from a local file
    (syncnet_python's syncnet_v2.model, a state dict). As there: frames resized to 224 x 224 (our clips
    are already face crops; syncnet_python's pipeline crops with a face detector first), BGR 0..255;
    5-frame lip windows against 20 MFCC frames (0.2 s) of 16-bit audio; offsets within +-vshift."""

    def __init__(self, weights: str, vshift: int = 15, batch_size: int = 20):
        super().__init__()
        self.vshift, self.batch_size = vshift, batch_size
        self.net = SyncNet()
        self.net.load_state_dict(load_state_dict(weights, "SyncNet"))
        self.net.eval().requires_grad_(False)
        self.describe = {"extractor": "SyncNet (syncnet_python S)", "weights": str(Path(weights)), "vshift": vshift,
                         "input": "224x224 BGR, 5-frame windows; MFCC 13 x 20"}

    @torch.no_grad()
    def embeddings(self, video: torch.Tensor, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip: video (T, 3, H, W) in [-1, 1], wav (S,) at 16 kHz -> lip, audio embeddings (T - 5, 1024)."""
        frames = F.interpolate(to_uint8(video).float(), size=(224, 224), mode="bilinear", align_corners=False)
        frames = frames.flip(1).permute(1, 0, 2, 3)  # RGB -> BGR, (3, T, 224, 224)
        pcm = (wav.double() * 32768).round().clamp(-32768, 32767)
        cepstra = mfcc(pcm).T.float()  # (13, 4 T - 1): 100 MFCC frames a second, 4 per video frame
        count = min(video.shape[0], len(wav) // (SAMPLE_RATE // FPS)) - 5
        lips, audio = [], []
        for first in range(0, count, self.batch_size):
            starts = range(first, min(count, first + self.batch_size))
            lips.append(self.net.forward_lip(torch.stack([frames[:, i:i + 5] for i in starts])))
            audio.append(self.net.forward_aud(torch.stack([cepstra[None, :, 4 * i:4 * i + 20] for i in starts])))
        return torch.cat(lips), torch.cat(audio)

    def forward(self, video: torch.Tensor, wav: torch.Tensor) -> list[dict[str, float]]:
        """video (B, T, 3, H, W) in [-1, 1], wav (B, S) -> per clip {"sync_d", "sync_c", "offset"}."""
        return [sync_scores(*self.embeddings(v, w), self.vshift) for v, w in zip(video, wav)]
