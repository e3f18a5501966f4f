"""`fada sample`: a talking-head mp4 (video + the audio track) from a checkpoint, one image and one audio file."""
from __future__ import annotations

import argparse
import importlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoints import read_checkpoint
from .diffusion.sampling import check_eta
from .pipeline import crop_reference, talking_video, talking_video_stream
from .video_io import Mp4Writer, read_audio, write_mp4

SAMPLE_RATE, FPS = 16000, 25


def load_module(ckpt: str | Path, map_location="cpu"):
    """The LightningModule a `fada fit` checkpoint (a file or a sharded run's folder) was made by, with its weights."""
    from lightning.pytorch.core.saving import _load_state

    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train one with `fada fit --config teacher.yaml`)")
    checkpoint = read_checkpoint(path, weights_only=False)
    if "fada_module" not in checkpoint:
        raise ValueError(f"{path} is not a fada-lightning checkpoint (no 'fada_module' entry)")
    module_name, cls_name = checkpoint["fada_module"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    if path.is_file():
        module = cls.load_from_checkpoint(path, map_location=map_location)
    else:
        module = _load_state(cls, checkpoint).to(map_location)  # what load_from_checkpoint does with what it read
    module.training_face_crop = training_face_crop(checkpoint)  # for `crop_reference`
    return module


def sample_video(module, image: np.ndarray, audio: np.ndarray, steps=None, ref_scale=None, audio_scale=None,
                 seed: int = 0, progress: bool = True, eta: float | None = None):
    """image (H, W, 3) uint8, audio (samples,) float32 at 16 kHz -> (frames (T, H, W, 3) uint8, NFE per window):
    `talking_video` with the module's sampling network, codec, audio features, sampler and settings."""
    size = module.preset["frame_size"]
    if image.shape != (size, size, 3):
        raise ValueError(f"reference image is {image.shape}, the model samples ({size}, {size}, 3) frames")
    ref_scale, audio_scale = module.sampling_scales(ref_scale, audio_scale)
    hp = module.hparams
    return talking_video(module.sampling_net, module.codec, module.audio_features, module.scheduler(), image, audio,
                         hp.clip_frames, hp.motion_frames, steps or hp.sample_steps, ref_scale, audio_scale,
                         generator=torch.Generator().manual_seed(seed), progress=progress,
                         eta=module.sample_eta if eta is None else eta)


def sample_stream(module, image: np.ndarray, audio: np.ndarray, output, chunk_ms: float = 200, steps=None,
                  ref_scale=None, audio_scale=None, seed: int = 0, eta: float | None = None) -> dict:
    """`sample_video` with the speech handed over `chunk_ms` at a time, as a live source gives it, and the
    mp4 written clip by clip as the clips come (fragmented: it plays while it grows, and a killed run
    leaves the clips so far). -> {"frames", "nfe" (per clip window), "seconds", "first_frame_seconds"}."""
    if chunk_ms <= 0:
        raise ValueError(f"--chunk-ms must be positive, got {chunk_ms}")
    size, hp = module.preset["frame_size"], module.hparams
    ref_scale, audio_scale = module.sampling_scales(ref_scale, audio_scale)
    step = max(1, round(SAMPLE_RATE * chunk_ms / 1000))
    chunks = (audio[i:i + step] for i in range(0, len(audio), step))
    clips = talking_video_stream(module.sampling_net, module.codec, module.audio_features, module.scheduler(), image,
                                 chunks, hp.clip_frames, hp.motion_frames, steps or hp.sample_steps, ref_scale,
                                 audio_scale, generator=torch.Generator().manual_seed(seed),
                                 eta=module.sample_eta if eta is None else eta)
    start, first, frames, nfes = time.perf_counter(), None, 0, []
    with Mp4Writer(output, size, size, live=True) as mp4:
        for video, speech, nfe in clips:
            first = first or time.perf_counter() - start
            mp4.write(video, speech)
            frames, nfes = frames + len(video), nfes + [nfe]
    return {"frames": frames, "nfe": float(np.mean(nfes)), "seconds": time.perf_counter() - start,
            "first_frame_seconds": first}


def probe_image(path) -> tuple[int, int]:
    """(width, height) of an image file, without decoding it; one clear error if it is not one."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error


def training_face_crop(checkpoint: dict) -> dict | None:
    """How a checkpoint's training faces were cropped (its data module's `face_crop`: fada prepare's
    detector, margin and analysis size), or None when the checkpoint does not say."""
    return next((state["face_crop"] for state in checkpoint.values()
                 if isinstance(state, dict) and isinstance(state.get("face_crop"), dict)), None)


def sample_file(ckpt, image_path, audio_path, output, steps=None, ref_scale=None, audio_scale=None, seed: int = 0,
                progress: bool = True, eta: float | None = None, crop: bool = True,
                stream_ms: float | None = None) -> dict:
    """Checkpoint + image file + audio file -> an mp4 at `output`; returns what it cost:
    {"output", "frames", "nfe" (per clip window), "seconds" (sampling wall time), "module"}.
    The face is cropped as the training clips were (`crop_reference`); crop=False takes the image
    as a cropped face (centre square, resized). stream_ms: the speech is streamed in chunks of that
    many ms and the mp4 written as the clips come (`sample_stream`; also "first_frame_seconds")."""
    width, height = probe_image(image_path)  # the inputs first: a wrong path costs no model load
    audio = read_audio(audio_path, SAMPLE_RATE)
    module = load_module(ckpt).eval()
    size = module.preset["frame_size"]
    if min(width, height) < size / 2:
        warnings.warn(f"reference image {image_path} is {width}x{height}, far below the model's {size}x{size} "
                      "frames: it is upscaled, and the video will be as blurry")
    image = crop_reference(image_path, size, module.training_face_crop if crop else None)
    module.sampling_scales(ref_scale, audio_scale)  # a one-pass student refuses CFG scales before any work
    check_eta(module.scheduler(), eta)  # and a deterministic sampler refuses an eta
    if stream_ms is not None:
        done = sample_stream(module, image, audio, output, stream_ms, steps, ref_scale, audio_scale, seed, eta)
        return {"output": str(output), **done, "module": module}
    start = time.perf_counter()
    frames, nfe = sample_video(module, image, audio, steps, ref_scale, audio_scale, seed, progress, eta)
    seconds = time.perf_counter() - start
    write_mp4(output, frames, audio, FPS, SAMPLE_RATE)
    return {"output": str(output), "frames": len(frames), "nfe": nfe, "seconds": seconds, "module": module}


def main(argv=None):
    p = argparse.ArgumentParser(prog="fada sample", description=__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `fada fit` (teacher or student)")
    p.add_argument("--image", required=True, help="reference face image (any PIL format): the face is found and "
                   "cropped as the model's training clips were (fada prepare's detector and margin)")
    p.add_argument("--no-crop", action="store_true", help="the image is a cropped face: centre square, resized")
    p.add_argument("--audio", required=True, help="speech audio (any format ffmpeg reads; resampled to 16 kHz mono)")
    p.add_argument("-o", "--output", default="sample.mp4")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--ref-cfg", type=float, default=None, help="reference CFG scale s_r (Eq 9)")
    p.add_argument("--audio-cfg", type=float, default=None, help="audio CFG scale s_a (Eq 9)")
    p.add_argument("--eta", type=float, default=None,
                   help="sampler stochasticity: TCD's gamma (default: the distiller's), DDIM's eta (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="live mode: the speech is handed over --chunk-ms at a "
                   "time, each clip is made as soon as its speech is there, and the mp4 grows clip by clip "
                   "(fragmented: it plays while written)")
    p.add_argument("--chunk-ms", type=float, default=200, help="with --stream: the speech chunk size (default 200)")
    args = p.parse_args(argv)
    try:
        done = sample_file(args.ckpt, args.image, args.audio, args.output, args.steps, args.ref_cfg, args.audio_cfg,
                           args.seed, eta=args.eta, crop=not args.no_crop,
                           stream_ms=args.chunk_ms if args.stream else None)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"fada sample: {err}") from None
    seconds = done["frames"] / FPS
    print(f"wrote {done['output']}: {done['frames']} frames ({seconds:.2f} s), "
          f"NFE {done['nfe']:g} per clip window ({type(done['module']).__name__}, "
          f"{type(done['module'].scheduler()).__name__}), {done['seconds']:.1f} s wall")
    if args.stream:
        print(f"streamed in {args.chunk_ms:g} ms chunks: first frames after {done['first_frame_seconds']:.2f} s, "
              f"{done['frames'] / done['seconds']:.1f} frames/s overall (live needs {FPS})")
    return done
