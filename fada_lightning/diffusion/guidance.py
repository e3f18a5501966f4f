"""Condition dropout for training and multi-CFG (Eq 9) for sampling.

A dropped condition is a zeroed tensor, so the three CFG passes are one batch:
    eps_hat = eps(0,0) + s_r [eps(r,0) - eps(0,0)] + s_a [eps(r,a) - eps(r,0)]    (Eq 9)
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Conditions:
    """c = (r, a, m) for a batch of B clips, in the network's latent space.

    ref:      (B, C, h, w)        reference latent r
    motion:   (B, M, C, h, w)     latents of the M frames before the clip (m)
    audio:    (B, F, W, L, D)     per-frame audio feature windows (a)
    guidance: (B, 2) or None      CFG scales (s_r, s_a) for a student that takes them as input (Eq 10);
                                  networks without CFG conditioning ignore it
    """

    ref: torch.Tensor
    motion: torch.Tensor
    audio: torch.Tensor
    guidance: torch.Tensor | None = None

    def map(self, fn) -> "Conditions":
        return Conditions(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in fields(self)})

    @staticmethod
    def cat(parts: list["Conditions"]) -> "Conditions":
        def cat_field(name):
            values = [getattr(p, name) for p in parts]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"cannot concatenate Conditions where only some have {name}")
            return torch.cat(values)
        return Conditions(**{f.name: cat_field(f.name) for f in fields(Conditions)})

    def with_guidance(self, ref_scale, audio_scale) -> "Conditions":
        """These conditions with guidance (B, 2) = (s_r, s_a); scales are floats or (B,) tensors."""
        b = self.ref.shape[0]
        scales = [torch.as_tensor(s, dtype=self.ref.dtype, device=self.ref.device).expand(b)
                  for s in (ref_scale, audio_scale)]
        return replace(self, guidance=torch.stack(scales, dim=1))


def _keep(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Zero the samples of x (B, ...) where mask (B,) is False."""
    return x * mask.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def condition_dropout(
    cond: Conditions,
    p_audio: float = 0.05,
    p_ref_audio: float = 0.05,
    p_motion: float = 0.05,
    generator: torch.Generator | None = None,
) -> Conditions:
    """SPEC dropout, three independent draws per sample: drop audio; drop reference and
    audio together; zero the motion frames. Teaches eps(0,0), eps(r,0) for Eq 9."""
    b = cond.ref.shape[0]
    u = torch.rand(3, b, generator=generator, device="cpu" if generator is None else generator.device)
    u = u.to(cond.ref.device)
    drop_audio, drop_ref_audio, drop_motion = u[0] < p_audio, u[1] < p_ref_audio, u[2] < p_motion
    return replace(
        cond,
        ref=_keep(~drop_ref_audio, cond.ref),
        audio=_keep(~(drop_audio | drop_ref_audio), cond.audio),
        motion=_keep(~drop_motion, cond.motion),
    )


def cfg_conditions(cond: Conditions) -> Conditions:
    """(B) -> (3B): the passes [(0,0); (r,0); (r,a)] of Eq 9 as one batch; motion kept in all."""
    no_audio = replace(cond, audio=torch.zeros_like(cond.audio))
    nothing = replace(no_audio, ref=torch.zeros_like(cond.ref))
    return Conditions.cat([nothing, no_audio, cond])


def multi_cfg(pred: torch.Tensor, ref_scale, audio_scale) -> torch.Tensor:
    """Eq 9 on the (3B, ...) output of a `cfg_conditions` batch -> (B, ...).

    Scales are floats or per-sample (B,) tensors. The combination is linear, so it
    holds for eps and v outputs alike.
    """
    uncond, ref_only, full = pred.chunk(3)
    s_r = torch.as_tensor(ref_scale, dtype=pred.dtype, device=pred.device)
    s_a = torch.as_tensor(audio_scale, dtype=pred.dtype, device=pred.device)
    if s_r.ndim:
        s_r = s_r.reshape(-1, *([1] * (full.ndim - 1)))
    if s_a.ndim:
        s_a = s_a.reshape(-1, *([1] * (full.ndim - 1)))
    return uncond + s_r * (ref_only - uncond) + s_a * (full - ref_only)
