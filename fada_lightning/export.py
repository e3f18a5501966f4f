"""`fada export`: a `fada fit` checkpoint (teacher or any student) -> a diffusers folder that
`FadaAvatarPipeline.from_pretrained` loads without the training code (fada_lightning/pipeline.py).

    fada export runs/teacher/tb/run/checkpoints/last.ckpt --out exported/teacher
    fada export STUDENT.ckpt --out exported/student --overwrite

The folder holds the network that samples (a student's EMA when it keeps one), the codec, the audio
features with their weights, the sampler's config and the sampling settings `fada sample` uses.
It is written beside its target as `.NAME.partial` and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .models.codec import VAECodec
from .pipeline import AudioEncoder, FadaAvatarPipeline
from .sample import load_module


def pipeline_of(module) -> FadaAvatarPipeline:
    """A loaded teacher or student module -> the pipeline that samples as `fada sample` does with it.
    The parts are the module's own (no copies), except the audio encoder, made from its features."""
    codec = module.codec
    if isinstance(codec, VAECodec):  # its config names the training machine's folder: record the VAE's own
        codec.register_to_config(config={k: v for k, v in codec.vae.config.items() if not k.startswith("_")})
    ref_scale, audio_scale = module.sampling_scales(None, None)  # (None, None): a one-pass student
    hp = module.hparams
    return FadaAvatarPipeline(
        denoiser=module.sampling_net, codec=codec,
        audio_encoder=AudioEncoder.of(module.preset["audio_features"], module.audio_features),
        scheduler=module.scheduler(), clip_frames=hp.clip_frames, motion_frames=hp.motion_frames,
        num_inference_steps=hp.sample_steps, ref_guidance_scale=ref_scale, audio_guidance_scale=audio_scale,
        eta=module.sample_eta, frame_size=module.preset["frame_size"],
        face_crop=getattr(module, "training_face_crop", None))


def export(ckpt, out, overwrite: bool = False) -> Path:
    """Write `ckpt`'s pipeline to the folder `out` (through `.NAME.partial`, renamed when complete)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out, or pass --overwrite to replace it")
    pipe = pipeline_of(load_module(ckpt).eval())
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a killed export's leftovers
    pipe.save_pretrained(partial, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="fada export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint written by `fada fit` (a file, or a sharded run's folder)")
    p.add_argument("--out", required=True, help="the diffusers folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"fada export: {err}") from None
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): load it with "
          f"FadaAvatarPipeline.from_pretrained({str(out)!r})")
    return out
