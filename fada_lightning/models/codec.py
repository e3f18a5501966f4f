"""Latent codecs: pixels (N, 3, H, W) in [-1, 1] <-> latents (N, C, h, w).

`micro` uses an exact, invertible space-to-depth codec (no VAE at this scale);
`sd15` uses diffusers' AutoencoderKL loaded from a local diffusers folder.
Both are diffusers models, so an exported pipeline (`fada export`) saves and loads them as parts.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import is_accelerate_available


class SpaceToDepthCodec(ModelMixin, ConfigMixin):
    """z = scale * pixel_unshuffle(x, factor): (N, 3, H, W) -> (N, 3 f^2, H/f, W/f), exact inverse.
    No weights: its saved folder is its config alone, and it answers diffusers' device and dtype
    questions itself (diffusers' lookup fails on a module without tensors)."""

    @register_to_config
    def __init__(self, factor: int = 4, scale: float = 1.0):
        super().__init__()
        self.factor, self.scale = factor, scale
        self.latent_channels = 3 * factor**2
        self.downsample = factor

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, self.factor) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.scale, self.factor)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # it holds nothing: it computes wherever its input is

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # and in its input's dtype

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, **kwargs) -> "SpaceToDepthCodec":
        """From a saved folder: its config is all there is (ModelMixin's loader wants a weights file)."""
        return cls.from_config(cls.load_config(folder, subfolder=subfolder))


class VAECodec(ModelMixin, ConfigMixin):
    """SD1.5's AutoencoderKL: z = scaling_factor * E(x) (posterior mean), x = D(z / scaling_factor).

    `path` is a local diffusers folder (with a `vae/` subfolder, or the VAE folder itself);
    nothing is downloaded. `config` builds the architecture without weights: for tests and
    shape checks on the meta device, and for `from_pretrained`, whose weights file then fills it in
    (`fada export` records the VAE's config in the codec's, never the training machine's path).
    """

    ignore_for_config = ["path", "subfolder"]

    @register_to_config
    def __init__(self, path: str | None = None, subfolder: str | None = "vae", config: dict | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        if path is not None:
            folder = Path(path).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"VAE folder {folder} does not exist (set model.codec.init_args.path to a local diffusers folder)")
            sub = subfolder if subfolder and (folder / subfolder).is_dir() else None
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder=sub, local_files_only=True,
                                                     low_cpu_mem_usage=is_accelerate_available())
        elif config is not None:
            self.vae = AutoencoderKL.from_config(config)
        else:
            raise ValueError("VAECodec needs a local `path` to pretrained weights (or an architecture `config` for tests)")
        self.vae.requires_grad_(False).eval()
        self.scaling_factor = self.vae.config.scaling_factor
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample
