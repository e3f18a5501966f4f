"""Sampling: one loop for any diffusers scheduler, Eq 9 guidance, NFE counting,
and clip-by-clip generation that carries motion frames from one clip to the next."""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from tqdm.auto import tqdm

from .guidance import Conditions, cfg_conditions, multi_cfg

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> prediction


class NFECounter:
    """Counts network evaluations per clip window: a call on a batch of k x B windows
    (k CFG passes of B clips) adds k. `nfe` is evaluations per clip window so far."""

    def __init__(self, net, clips: int):
        self.net, self.clips, self.evaluations = net, clips, 0

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        self.evaluations += sample.shape[0]
        return self.net(sample, *args, **kwargs)

    def encode_reference(self, cond: Conditions):
        return self.net.encode_reference(cond)  # the reference net runs at t = 0 once a clip: not a step

    @property
    def takes_guidance(self) -> bool:
        return takes_guidance(self.net)

    @property
    def nfe(self) -> float:
        return self.evaluations / self.clips


def guided_denoiser(net, cond: Conditions, ref_scale: float, audio_scale: float) -> DenoiseFn:
    """Eq 9 with the three passes as one (3B) batch; the reference bank is computed once here
    and reused at every step (it depends only on r and m, never on z_t or t)."""
    cond3 = cfg_conditions(cond)
    bank = net.encode_reference(cond3)

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        t3 = t.repeat(3) if t.ndim else t  # per-sample timesteps (B,) -> (3B,)
        pred = net(z.repeat(3, *([1] * (z.ndim - 1))), t3, cond3, reference=bank)
        return multi_cfg(pred, ref_scale, audio_scale)

    return denoise


def conditional_denoiser(net, cond: Conditions) -> DenoiseFn:
    """One pass a step, no guidance (students that learnt the guided output)."""
    bank = net.encode_reference(cond)
    return lambda z, t: net(z, t, cond, reference=bank)


def takes_guidance(net) -> bool:
    """True for a network that reads the CFG scales from `cond.guidance` (a multi-CFG distilled student)."""
    return getattr(net, "takes_guidance", False)


def denoiser_for(net, cond: Conditions, ref_scale: float | None, audio_scale: float | None) -> DenoiseFn:
    """Scales None: one conditional pass. Scales and a net that takes them: one pass told the
    scales (`cond.guidance`). Scales otherwise: Eq 9's three passes as one batch."""
    if ref_scale is None:
        return conditional_denoiser(net, cond)
    if takes_guidance(net):
        return conditional_denoiser(net, cond.with_guidance(ref_scale, audio_scale))
    return guided_denoiser(net, cond, ref_scale, audio_scale)


@torch.no_grad()
def sample_loop(denoise: DenoiseFn, noise: torch.Tensor, scheduler, num_steps: int,
                generator: torch.Generator | None = None, progress: bool = False,
                eta: float | None = None) -> torch.Tensor:
    """z_T = noise; for t in scheduler.timesteps: z <- scheduler.step(denoise(z, t), t, z).
    eta, when given, goes to every step (DDIM's eta, TCD's gamma), as diffusers' pipelines pass it."""
    scheduler.set_timesteps(num_steps, device=noise.device)
    step_kwargs = {} if eta is None else {"eta": eta}
    z = noise * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress):
        z = scheduler.step(denoise(z, t), t, z, generator=generator, **step_kwargs).prev_sample
    return z


def check_eta(scheduler, eta: float | None) -> None:
    """A clear error for an eta given to a scheduler whose step takes none (PeRFlowScheduler)."""
    if eta is not None and "eta" not in inspect.signature(scheduler.step).parameters:
        raise ValueError(f"{type(scheduler).__name__} is deterministic: its step takes no eta (gamma)")


@torch.no_grad()
def generate_clips(net, scheduler, ref: torch.Tensor, audio: torch.Tensor, clip_frames: int, motion_frames: int,
                   num_steps: int, ref_scale: float | None = 2.5, audio_scale: float | None = 6.5,
                   generator: torch.Generator | None = None, progress: bool = False, eta: float | None = None):
    """Latent video for audio of any length, one clip window at a time (`iter_clips` over its windows).

    ref (B, C, h, w) reference latents; audio (B, T, W, L, D) feature windows for all T frames.
    Returns (latents (B, T, C, h, w), NFE per clip window).
    """
    counter = NFECounter(net, clips=audio.shape[0])
    windows = range(0, audio.shape[1], clip_frames)
    clips = list(iter_clips(counter, scheduler, ref, (audio[:, start:start + clip_frames] for start in windows),
                            clip_frames, motion_frames, num_steps, ref_scale, audio_scale, generator,
                            progress, eta, total=len(windows)))
    return torch.cat(clips, dim=1)[:, :audio.shape[1]], counter.nfe / len(windows)


@torch.no_grad()
def iter_clips(net, scheduler, ref: torch.Tensor, windows, clip_frames: int, motion_frames: int, num_steps: int,
               ref_scale: float | None, audio_scale: float | None, generator: torch.Generator | None = None,
               progress: bool = False, eta: float | None = None, total: int | None = None):
    """Clip windows sampled one after another, each as soon as its audio is given: for every audio
    window (B, F', W, L, D), F' <= clip_frames (a short last one is padded with null audio), yields
    its latents (B, clip_frames, C, h, w). The first clip's motion frames are the reference repeated;
    each later clip takes the last M frames generated. Scales None -> one conditional pass a step, else
    `denoiser_for` (one pass for a net that takes the scales, Eq 9's three otherwise); eta goes to the
    scheduler's step. A clip draws its noise (in float32, so every dtype starts from the same), then its
    steps' noise, from `generator`, so a stream of windows makes the clips one call on all of them makes."""
    check_eta(scheduler, eta)
    motion = ref[:, None].expand(-1, motion_frames, -1, -1, -1)
    for window in tqdm(windows, desc="clips", total=total, disable=not progress or total == 1):
        b = window.shape[0]
        if window.shape[1] < clip_frames:  # pad the last window with null (zero) audio
            window = torch.cat([window, window.new_zeros(b, clip_frames - window.shape[1], *window.shape[2:])], 1)
        cond = Conditions(ref=ref, motion=motion, audio=window)
        denoise = denoiser_for(net, cond, ref_scale, audio_scale)
        noise = torch.randn((b, clip_frames, *ref.shape[1:]), generator=generator, device=ref.device).to(ref.dtype)
        clip = sample_loop(denoise, noise, scheduler, num_steps, generator, progress, eta)
        yield clip
        motion = clip[:, -motion_frames:]


def dtype_of(module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of a module's weights (`default` for one without any, such as SpaceToDepthCodec)."""
    return next((p.dtype for p in module.parameters()), default)


def encode_reference(codec, net, ref: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> the reference latent, in the codec's dtype in and the net's out
    (a pipeline loaded with torch_dtype runs in it; float32 pixels come in)."""
    return codec.encode(ref.to(dtype_of(codec, ref.dtype))).to(dtype_of(net, ref.dtype))


def decode_latents(codec, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, F, C, h, w) -> pixels (B, F, 3, H, W) in [-1, 1], float32."""
    frames = codec.decode(latents.flatten(0, 1).to(dtype_of(codec, latents.dtype)))
    return frames.unflatten(0, latents.shape[:2]).float().clamp(-1, 1)


@torch.no_grad()
def generate_video(net, codec, scheduler, ref: torch.Tensor, audio: torch.Tensor, clip_frames: int, motion_frames: int,
                   num_steps: int, ref_scale: float | None, audio_scale: float | None,
                   generator: torch.Generator | None = None, progress: bool = False, eta: float | None = None):
    """`generate_clips` in pixels: ref (B, 3, H, W) in [-1, 1], audio (B, T, W, L, D) ->
    (video (B, T, 3, H, W) in [-1, 1], NFE per clip window). The net samples in eval mode, in its own
    dtype, and is handed back in the mode it came in."""
    was_training = net.training
    net.eval()
    try:
        latents, nfe = generate_clips(net, scheduler, encode_reference(codec, net, ref), audio.to(dtype_of(net)),
                                      clip_frames, motion_frames, num_steps, ref_scale, audio_scale,
                                      generator=generator, progress=progress, eta=eta)
    finally:
        net.train(was_training)
    return decode_latents(codec, latents), nfe
