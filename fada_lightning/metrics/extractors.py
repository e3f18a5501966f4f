"""Feature extractors for the evaluation metrics, each loaded from a local file (never downloaded).

Every extractor is called on generated or real clips, video (B, T, 3, H, W) in [-1, 1], and plays one role:
  frame features  -> (B T, D)   FID            (`InceptionFrames`; synthetic world: `WorldFrames`)
  video features  -> (B, D)     FVD            (`R3DVideo`, a 3D ResNet as FADA's FVD-R; `WorldVideo`)
  expression      -> (B T, P)   E-FID          (`ScriptedFrameModel`, e.g. a 3DMM regressor; `WorldExpression`)
  quality         -> (B T,)     IQA, no reference (`ScriptedFrameModel`; `WorldQuality`)
Sync-D / Sync-C take the audio too (metrics/sync.py). Each has `describe`: what its numbers depend on.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 levels 0..255, as the frames would be written to a video file."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a local file; never unpickles code (weights_only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights {path} do not exist: every evaluation network is a local file "
                                f"(nothing is downloaded); see docs/evaluation.md for where to get them")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{what} weights {path} are not a plain state dict of tensors ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what} weights {path} hold a {type(state).__name__}, not a state dict")
    return state


class InceptionFrames(nn.Module):
    """FID's features: Inception-v3 pool3 (2048) through torchmetrics (torch-fidelity's TF-ported
    network, frames resized to 299 inside), weights from a local file, e.g. torch-fidelity's
    weights-inception-2015-12-05-6726825d.pth."""

    def __init__(self, weights: str, batch_size: int = 64):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        load_state_dict(weights, "Inception")  # refuse a file that is more than tensors before torch-fidelity reads it
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights))
        self.batch_size = batch_size
        self.describe = {"extractor": "Inception-v3 pool3 (torchmetrics / torch-fidelity)", "weights": str(weights),
                         "input": "uint8 frames resized to 299x299"}

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        frames = to_uint8(video.flatten(0, 1))
        return torch.cat([self.net(chunk) for chunk in frames.split(self.batch_size)]).reshape(len(frames), -1)


class R3DVideo(nn.Module):
    """FVD's features with a 3D ResNet (torchvision's r3d_18, Kinetics-400 normalisation; the pooled
    512-d layer before its classifier), weights from a local file (torchvision's r3d_18 state dict).
    Each clip is one sample of all its frames, resized to `size` x `size`."""

    MEAN, STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)

    def __init__(self, weights: str, size: int = 112):
        super().__init__()
        from torchvision.models.video import r3d_18

        self.net = r3d_18(weights=None)
        self.net.load_state_dict(load_state_dict(weights, "3D ResNet (r3d_18)"))
        self.net.fc = nn.Identity()
        self.net.eval().requires_grad_(False)
        self.size = size
        self.register_buffer("mean", torch.tensor(self.MEAN)[:, None, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(self.STD)[:, None, None, None], persistent=False)
        self.describe = {"extractor": "torchvision r3d_18 (avgpool, 512)", "weights": str(weights),
                         "input": f"all frames of a clip at {size}x{size}, Kinetics normalisation"}

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        frames = F.interpolate(video.flatten(0, 1).float(), size=(self.size, self.size), mode="bilinear",
                               align_corners=False).unflatten(0, (b, t))
        clips = ((frames.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, 3, T, s, s) in [0, 1]
        return self.net((clips - self.mean) / self.std)


class ScriptedFrameModel(nn.Module):
    """A TorchScript file mapping frames (N, 3, H, W) in [-1, 1] to per-frame outputs (N, P) or (N,):
    the way to plug in an expression regressor (E-FID; e.g. a 3DMM coefficient network) or a
    no-reference quality model (IQA) without code here. `size` resizes frames first."""

    def __init__(self, path: str, size: int | None = None, batch_size: int = 64):
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript model {path} does not exist")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.size, self.batch_size = size, batch_size
        self.describe = {"extractor": "TorchScript", "weights": str(path), "input": "frames in [-1, 1]"
                         + (f" at {size}x{size}" if size else " at the clip's resolution")}

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.flatten(0, 1).float()
        if self.size:
            frames = F.interpolate(frames, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = torch.cat([self.net(chunk) for chunk in frames.split(self.batch_size)])
        return out.squeeze(-1) if out.ndim == 2 and out.shape[-1] == 1 else out  # (N, P), or (N,) for one score
