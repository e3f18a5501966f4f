"""FadaAvatarPipeline: a trained teacher or student as a diffusers pipeline, with no training code on its path.

`fada export CKPT --out DIR` writes the folder; then

    from fada_lightning.pipeline import FadaAvatarPipeline
    pipe = FadaAvatarPipeline.from_pretrained(DIR)
    out = pipe("face.png", "speech.wav", generator=torch.Generator().manual_seed(0))
    out.save("talking.mp4")          # out.frames (T, H, W, 3) uint8 at 25 fps, out.audio, out.nfe

The folder (docs/inference.md): model_index.json (the parts below and the sampling settings: clip and
motion frames, steps, the two guidance scales, eta, frame size, the training clips' face crop) and one
subfolder a part, each a diffusers config with its weights in safetensors:
    denoiser/       AvatarDenoiser: reference UNet, denoising UNet, audio projection, CFG tokens/layers
    codec/          SpaceToDepthCodec (config alone) or VAECodec (SD1.5's AutoencoderKL)
    audio_encoder/  the audio features the model was trained on (log-mel; wav2vec2 with its weights)
    scheduler/      the sampler: DDIM (teacher), TCD, PeRFlow, DMD (DMD, one-step)
For the same inputs and seed the pipeline makes the frames `fada sample` makes (`talking_video` is
both), to float tolerance. Nothing here imports Lightning.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput, is_accelerate_available
from torch import nn

from datamodules.audio_features import SAMPLE_RATE, SAMPLES_PER_FRAME, audio_windows

from .diffusion.sampling import NFECounter, decode_latents, dtype_of, encode_reference, generate_video, iter_clips
from .models.codec import SpaceToDepthCodec, VAECodec
from .models.denoiser import AvatarDenoiser
from .video_io import read_audio, read_image, write_mp4


class AudioEncoder(ModelMixin, ConfigMixin):
    """The audio features a model was trained on, as a pipeline part: (wav (samples,) at 16 kHz,
    num_frames) -> (num_frames, L, D), as `datamodules.audio_features` computes them.

    class_path, init_args: the feature class and its arguments (a preset's `audio_features`), less a
    local `weights` file: the feature class's own modules (log-mel's filterbank, wav2vec2's network)
    are this part's weights, saved beside its config."""

    @register_to_config
    def __init__(self, class_path: str, init_args: dict | None = None):
        super().__init__()
        module, name = class_path.rsplit(".", 1)
        default = torch.get_default_dtype()  # from_pretrained(dtype=...) builds parts in that dtype
        torch.set_default_dtype(torch.float32)
        try:
            self.features = getattr(importlib.import_module(module), name)(**(init_args or {}))
        finally:
            torch.set_default_dtype(default)
        self.parts = self.modules_of(self.features)  # the same modules: loading weights fills the features

    @staticmethod
    def modules_of(features) -> nn.ModuleDict:
        """A feature object's nn.Module attributes (the features are plain objects, not modules)."""
        return nn.ModuleDict({k: v for k, v in vars(features).items() if isinstance(v, nn.Module)})

    @classmethod
    def of(cls, spec: dict, features) -> "AudioEncoder":
        """The part for `features`, made from `spec` ({class_path, init_args}), with their weights."""
        encoder = cls(spec["class_path"], {k: v for k, v in (spec.get("init_args") or {}).items() if k != "weights"})
        encoder.parts.load_state_dict(cls.modules_of(features).state_dict())
        return encoder

    @property
    def context_frames(self) -> int:
        return self.features.context_frames

    @property
    def num_layers(self) -> int:
        return self.features.num_layers

    @property
    def dim(self) -> int:
        return self.features.dim

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "AudioEncoder":
        """Always in float32 (see `_apply`): diffusers' lean loading (with `accelerate`) would cast the
        weights to the pipeline's dtype as it reads them."""
        kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _apply(self, fn, recurse=True):
        """Moves follow the pipeline, casts do not: the features run in float32 (an STFT, wav2vec2's
        norms) whatever a pipeline's dtype, and hand the denoiser float32 to cast. `fn` only names
        the device: each float tensor goes there as it is (never through a cast and back)."""
        return super()._apply(lambda t: t.to(fn(t).device) if t.is_floating_point() else fn(t), recurse)

    def forward(self, wav: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.features(wav.float(), num_frames)


def audio_feature_windows(audio_features, audio: np.ndarray, radius: int) -> torch.Tensor:
    """audio (samples,) float32 at 16 kHz -> (1, T, 2 radius + 1, L, D): a frame for every 40 ms begun."""
    num_frames = int(np.ceil(len(audio) / SAMPLES_PER_FRAME))
    feats = audio_features(torch.tensor(audio), num_frames)  # (T, L, D); pads the last frame
    return audio_windows(feats, 0, num_frames, radius)[None]


def to_pixels(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1]."""
    return torch.tensor(image).permute(2, 0, 1).float().div(127.5).sub(1)[None]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((video.permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def talking_video(net: AvatarDenoiser, codec, audio_features, scheduler, image: np.ndarray, audio: np.ndarray,
                  clip_frames: int, motion_frames: int, steps: int, ref_scale: float | None, audio_scale: float | None,
                  generator: torch.Generator | None = None, progress: bool = True, eta: float | None = None):
    """image (H, W, 3) uint8, audio (samples,) float32 at 16 kHz -> (frames (T, H, W, 3) uint8, NFE per
    clip window): what `fada sample` (from a checkpoint's parts) and FadaAvatarPipeline (from the exported
    ones) both run. Scales None: one conditional pass a step (`generate_clips`)."""
    windows = audio_feature_windows(audio_features, audio, net.audio_projection.window // 2)
    video, nfe = generate_video(net, codec, scheduler, to_pixels(image).to(net.device), windows.to(net.device), clip_frames,
                                motion_frames, steps, ref_scale, audio_scale, generator=generator, progress=progress,
                                eta=eta)
    return to_uint8(video[0]), nfe


class SpeechStream:
    """Speech arriving in chunks -> the audio feature windows of each clip window, each as soon as the
    speech it reads has arrived: frames [s, s + F) read the features of frames s - r .. s + F - 1 + r (the
    denoiser's audio window, radius r), and each of those the speech of `context_frames` frames either
    side (the features' own). When the speech ends, the rest goes out as `talking_video` cuts it: a frame
    for every 40 ms begun, the last window short, frames past the end null. For log-mel the windows equal
    the whole file's (to float tolerance)."""

    def __init__(self, audio_features, clip_frames: int, radius: int):
        self.features, self.clip_frames, self.radius = audio_features, clip_frames, radius
        self.context = audio_features.context_frames

    def windows(self, chunks):
        """chunks: an iterable of (samples,) float arrays at 16 kHz -> yields (windows (1, F', W, L, D),
        speech (samples,) float32 under those F' frames), one pair a clip window. Speech no later window
        reads is let go, so an hour-long stream holds seconds of it."""
        speech, dropped, start = np.zeros(0, np.float32), 0, 0  # speech: samples [dropped, dropped + len)
        for chunk in chunks:
            speech = np.concatenate([speech, np.asarray(chunk, np.float32).reshape(-1)])
            while dropped + len(speech) >= (start + self.clip_frames + self.radius + self.context) * SAMPLES_PER_FRAME:
                yield self._window(speech, dropped, start, self.clip_frames, None)
                start += self.clip_frames
                keep = max(0, start - self.radius - self.context) * SAMPLES_PER_FRAME  # the next window's first read
                speech, dropped = speech[keep - dropped:], keep
        total = int(np.ceil((dropped + len(speech)) / SAMPLES_PER_FRAME))
        for begin in range(start, total, self.clip_frames):
            yield self._window(speech, dropped, begin, min(self.clip_frames, total - begin), total)

    def _window(self, speech: np.ndarray, dropped: int, start: int, count: int, total: int | None):
        """Frames [start, start + count): features of [first, last) read with `context` frames of margin;
        `speech` holds the samples from `dropped` on."""
        first = max(0, start - self.radius - self.context)
        last = start + count + self.radius + self.context
        last = last if total is None else min(last, total)
        wav = torch.tensor(speech[first * SAMPLES_PER_FRAME - dropped:last * SAMPLES_PER_FRAME - dropped])
        feats = self.features(wav, last - first)  # (last - first, L, D); a short end is padded with silence
        windows = audio_windows(feats, start - first, count, self.radius)  # frames before `first`: never read
        return windows[None], speech[start * SAMPLES_PER_FRAME - dropped:(start + count) * SAMPLES_PER_FRAME - dropped]


@torch.no_grad()
def talking_video_stream(net: AvatarDenoiser, codec, audio_features, scheduler, image: np.ndarray, speech_chunks,
                         clip_frames: int, motion_frames: int, steps: int, ref_scale: float | None,
                         audio_scale: float | None, generator: torch.Generator | None = None, eta: float | None = None):
    """`talking_video` for speech that arrives in chunks (any sizes): yields (frames (F', H, W, 3) uint8,
    speech (samples,) under them, NFE) one clip window at a time, each as soon as `SpeechStream` has its
    audio; motion frames carry from clip to clip. With the same generator the frames are
    `talking_video`'s (to float tolerance, log-mel features)."""
    stream = SpeechStream(audio_features, clip_frames, net.audio_projection.window // 2)
    ref = to_pixels(image).to(net.device)
    counter, spoken, done = NFECounter(net, clips=1), [], 0

    def windows():
        for window, speech in stream.windows(speech_chunks):
            spoken.append(speech)
            yield window.to(net.device, dtype_of(net))

    was_training = net.training
    net.eval()
    try:
        for clip in iter_clips(counter, scheduler, encode_reference(codec, net, ref), windows(), clip_frames,
                               motion_frames, steps, ref_scale, audio_scale, generator=generator, eta=eta):
            speech, nfe, done = spoken.pop(0), counter.evaluations - done, counter.evaluations
            video = decode_latents(codec, clip[:, :int(np.ceil(len(speech) / SAMPLES_PER_FRAME))])[0]
            yield to_uint8(video), speech, nfe
    finally:
        net.train(was_training)


def crop_reference(image_path, size: int, face_crop: dict | None) -> np.ndarray:
    """The reference image as the model saw faces in training -> (size, size, 3) uint8: detected and
    cropped square around the face with `face_crop`'s detector and margin (fada prepare's crop), or,
    with no recorded crop or detector none, centre-cropped whole. No face is an error; several, a
    warning (the largest is used)."""
    if not face_crop or face_crop.get("detector", "none") == "none":
        return read_image(image_path, size)
    import cv2

    from datamodules.prepare.faces import crop_frames, make_detector

    image = read_image(image_path, None)
    short = min(image.shape[:2])
    scale = min(1.0, face_crop.get("analysis_size", 256) / short)
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    detector = make_detector(face_crop["detector"], **face_crop.get("detector_args", {}))
    boxes = np.asarray(detector(small), np.float32).reshape(-1, 4) / scale
    if len(boxes) == 0:
        raise ValueError(f"{image_path}: the {face_crop['detector']} face detector the training clips were cropped "
                         "with finds no face; give a cropped face image with --no-crop")
    if len(boxes) > 1:
        warnings.warn(f"{image_path}: {len(boxes)} faces found; the largest is used (crop the image yourself "
                      "and pass --no-crop to choose another)")
    largest = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
    return crop_frames(image[None], largest[None], face_crop["margin"], size)[0]


@dataclass
class FadaAvatarPipelineOutput(BaseOutput):
    """frames (T, H, W, 3) uint8 at 25 fps; audio (samples,) float32 at 16 kHz, the speech they follow;
    nfe: network evaluations per clip window."""

    frames: np.ndarray
    audio: np.ndarray
    nfe: float

    def save(self, path) -> None:
        """An mp4 (H.264 and AAC) of the frames with the speech as its sound track."""
        write_mp4(path, self.frames, self.audio)


class FadaAvatarPipeline(DiffusionPipeline):
    """A talking head from one face image and speech; see the module docstring. The settings are the
    exported model's: `num_inference_steps` its sampler's steps, `ref_guidance_scale` and
    `audio_guidance_scale` Eq 9's s_r and s_a (None for a student that samples with one pass and no
    scales), `eta` the sampler step's stochasticity (TCD's gamma; None: the scheduler's own)."""

    model_cpu_offload_seq = "audio_encoder->denoiser->codec"

    def __init__(self, denoiser: AvatarDenoiser, codec: SpaceToDepthCodec | VAECodec, audio_encoder: AudioEncoder,
                 scheduler, clip_frames: int = 8, motion_frames: int = 2, num_inference_steps: int = 25,
                 ref_guidance_scale: float | None = 2.5, audio_guidance_scale: float | None = 6.5,
                 eta: float | None = None, frame_size: int = 32, face_crop: dict | None = None):
        super().__init__()
        self.register_modules(denoiser=denoiser, codec=codec, audio_encoder=audio_encoder, scheduler=scheduler)
        self.register_to_config(clip_frames=clip_frames, motion_frames=motion_frames,
                                num_inference_steps=num_inference_steps, ref_guidance_scale=ref_guidance_scale,
                                audio_guidance_scale=audio_guidance_scale, eta=eta, frame_size=frame_size,
                                face_crop=face_crop)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # diffusers loads on the meta device (no second copy of the weights) only with `accelerate`
        # installed, and without it says so at every load: ask for that loading only when it can happen
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def guidance_scales(self, ref_scale: float | None, audio_scale: float | None) -> tuple:
        """The (s_r, s_a) to sample with: the given ones, else the exported defaults; (None, None) for
        a one-pass student, which refuses scales."""
        defaults = self.config.ref_guidance_scale, self.config.audio_guidance_scale
        if defaults == (None, None):
            if ref_scale is not None or audio_scale is not None:
                raise ValueError("this model samples with one pass a step (its guidance is distilled in); "
                                 "guidance scales do not apply to it")
            return None, None
        return (defaults[0] if ref_scale is None else ref_scale, defaults[1] if audio_scale is None else audio_scale)

    def reference_image(self, image) -> np.ndarray:
        """A path (cropped as the training clips were), a PIL image or an (H, W, 3) uint8 array of the
        cropped face at the model's frame size -> (size, size, 3) uint8."""
        size = self.config.frame_size
        if isinstance(image, (str, os.PathLike)):
            return crop_reference(image, size, self.config.face_crop)
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise ValueError(f"reference image is {image.shape} {image.dtype}, the model samples ({size}, {size}, 3) "
                             "uint8 frames: crop and resize the face first, or give a path to have it cropped as "
                             "the training clips were")
        return image

    @staticmethod
    def speech(audio) -> np.ndarray:
        """A path (any format ffmpeg reads) or a (samples,) float array at 16 kHz -> (samples,) float32."""
        if isinstance(audio, (str, os.PathLike)):
            audio = read_audio(audio, SAMPLE_RATE)
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"audio is an array of shape {audio.shape}: give mono samples (samples,) at 16 kHz")
        return audio

    @torch.no_grad()
    def __call__(self, image, audio, num_inference_steps: int | None = None, ref_guidance_scale: float | None = None,
                 audio_guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 eta: float | None = None, return_dict: bool = True):
        """image: a path, PIL image or (H, W, 3) uint8 array; audio: a path or (samples,) float at 16 kHz.
        -> FadaAvatarPipelineOutput (frames (T, H, W, 3) uint8, T = one frame for every 40 ms of audio
        begun), or (frames, audio, nfe) with return_dict=False."""
        image, audio = self.reference_image(image), self.speech(audio)
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        frames, nfe = talking_video(
            self.denoiser, self.codec, self.audio_encoder, self.scheduler, image, audio,
            **self._sampling(num_inference_steps, ref_guidance_scale, audio_guidance_scale, eta),
            generator=generator, progress=progress)
        return FadaAvatarPipelineOutput(frames, audio, nfe) if return_dict else (frames, audio, nfe)

    @torch.no_grad()
    def stream(self, image, speech_chunks, num_inference_steps: int | None = None,
               ref_guidance_scale: float | None = None, audio_guidance_scale: float | None = None,
               generator: torch.Generator | None = None, eta: float | None = None):
        """Live generation: speech_chunks, an iterable of (samples,) float arrays at 16 kHz of any sizes (a
        microphone's 200 ms at a time, say) -> yields a FadaAvatarPipelineOutput a clip window (its frames,
        the speech under them, its NFE) as soon as the speech it reads has arrived (`SpeechStream`); the
        motion frames carry over. With the same generator the frames are `__call__`'s on the whole speech."""
        yield from (FadaAvatarPipelineOutput(frames, speech, nfe) for frames, speech, nfe in talking_video_stream(
            self.denoiser, self.codec, self.audio_encoder, self.scheduler, self.reference_image(image), speech_chunks,
            **self._sampling(num_inference_steps, ref_guidance_scale, audio_guidance_scale, eta), generator=generator))

    def _sampling(self, steps, ref_scale, audio_scale, eta) -> dict:
        """The sampler's arguments: the given ones, else the exported model's."""
        ref_scale, audio_scale = self.guidance_scales(ref_scale, audio_scale)
        return dict(clip_frames=self.config.clip_frames, motion_frames=self.config.motion_frames,
                    steps=steps or self.config.num_inference_steps, ref_scale=ref_scale, audio_scale=audio_scale,
                    eta=self.config.eta if eta is None else eta)
