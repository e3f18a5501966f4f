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
from .pipeline import crop_reference, talking_video
from .video_io import read_audio, write_mp4

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
                progress: bool = True, eta: float | None = None, crop: bool = True) -> dict:
    """Checkpoint + image file + audio file -> an mp4 at `output`; returns what it cost:
    {"output", "frames", "nfe" (per clip window), "seconds" (sampling wall time), "module"}.
    The face is cropped as the training clips were (`crop_reference`); crop=False takes the image
    as a cropped face (centre square, resized)."""
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
    args = p.parse_args(argv)
    try:
        done = sample_file(args.ckpt, args.image, args.audio, args.output, args.steps, args.ref_cfg, args.audio_cfg,
                           args.seed, eta=args.eta, crop=not args.no_crop)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"fada sample: {err}") from None
    print(f"wrote {done['output']}: {done['frames']} frames ({done['frames'] / FPS:.2f} s), "
          f"NFE {done['nfe']:g} per clip window ({type(done['module']).__name__}, "
          f"{type(done['module'].scheduler()).__name__}), {done['seconds']:.1f} s wall")
    return done
