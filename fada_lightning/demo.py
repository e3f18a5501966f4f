"""`make demo`: synthetic data -> the `micro` teacher -> a talking-head mp4 from a face and a voice
the teacher never saw, with an honest measure of how well the mouth follows the audio.

    python -m fada_lightning.demo [--steps N] [--out runs/demo] [--retrain]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import decord
import numpy as np
import torch
from PIL import Image

from datamodules.synthetic import frame_rms, mouth_dark_pixels, render_clip
from fada_lightning import cli, sample
from fada_lightning.video_io import encode_wav, write_atomic

HELD_OUT_SEED = 2026  # training clips use seed 0, validation seed 1000: this face and voice are new


def mouth_sync(video: np.ndarray, audio: np.ndarray) -> float:
    """corr(dark mouth pixels per frame, loudness per frame): 1 = the mouth opens exactly with the voice."""
    mouth, loud = mouth_dark_pixels(video).astype(float), frame_rms(audio)[: len(video)]
    if mouth.std() == 0:
        return 0.0
    return float(np.corrcoef(mouth[: len(loud)], loud)[0, 1])


def chance_sync(video: np.ndarray, clips: int = 30) -> tuple[float, float]:
    """The same measure against other voices' loudness: what no lip sync at all scores."""
    # only their audio is used, which does not depend on the rendered size
    voices = (render_clip(HELD_OUT_SEED, "strict", i, size=32, frames=len(video))[1] for i in range(1, clips + 1))
    scores = [mouth_sync(video, audio) for audio in voices]
    return float(np.mean(scores)), float(np.std(scores))


def loudness_table(video: np.ndarray, audio: np.ndarray) -> str:
    """Mean dark mouth pixels on quiet / middling / loud frames."""
    mouth, loud = mouth_dark_pixels(video), frame_rms(audio)[: len(video)]
    rel = loud / loud.max()
    bins = {"quiet": rel < 0.15, "mid": (rel >= 0.15) & (rel < 0.6), "loud": rel >= 0.6}
    return " / ".join(f"{name} {mouth[mask].mean():.0f}" if mask.any() else f"{name} -" for name, mask in bins.items())


def train_teacher(out: Path, steps: int, retrain: bool) -> Path:
    ckpt = out / "teacher" / "tb" / "demo" / "checkpoints" / "last.ckpt"
    if ckpt.exists() and not retrain:
        print(f"[demo] reusing the teacher at {ckpt} (--retrain, or delete {out}, to train again)")
        return ckpt
    shutil.rmtree(out / "teacher", ignore_errors=True)
    root = out / "teacher"
    cli.main(["fit", "--config", "teacher.yaml", f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root}",
              f"--trainer.logger.init_args.save_dir={root}", "--trainer.logger.init_args.version=demo",
              f"--trainer.val_check_interval={min(250, steps)}"])
    return ckpt


def main(argv=None):
    p = argparse.ArgumentParser(prog="fada demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="teacher training steps (about 1 s each here)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the held-out speech clip")
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    ckpt = train_teacher(out, args.steps, args.retrain)
    trained = time.perf_counter()

    frames = int(args.seconds * 25)
    size = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["hyper_parameters"]["preset"]["frame_size"]
    truth, audio, _ = render_clip(HELD_OUT_SEED, "strict", 0, size=size, frames=frames)
    face, speech = out / "face.png", out / "speech.wav"
    Image.fromarray(truth[0]).save(face)
    write_atomic(speech, encode_wav(audio))
    video_path = out / "teacher_sample.mp4"
    print(f"[demo] sampling {args.seconds:g} s of speech for a face the teacher never saw")
    sample.main(["--ckpt", str(ckpt), "--image", str(face), "--audio", str(speech), "-o", str(video_path)])
    sampled = decord.VideoReader(str(video_path))[:].asnumpy()

    chance_mean, chance_std = chance_sync(sampled)
    print("\n==== fada-lightning demo ====")
    print(f"teacher checkpoint : {ckpt}")
    print(f"TensorBoard logs   : {ckpt.parent.parent}   (tensorboard --logdir {out})")
    print(f"reference / audio  : {face} / {speech}")
    print(f"sampled video      : {video_path}")
    print("mouth follows audio (correlation of dark mouth pixels with loudness, per frame):")
    print(f"  teacher sample   : {mouth_sync(sampled, audio):+.2f}   [{loudness_table(sampled, audio)}]")
    print(f"  ground truth     : {mouth_sync(truth, audio):+.2f}   [{loudness_table(truth, audio)}]")
    print(f"  other voices     : {chance_mean:+.2f} +- {chance_std:.2f}   (the sample against 30 other clips' loudness)")
    print(f"time: teacher {trained - start:.0f} s, sampling and measuring {time.perf_counter() - trained:.0f} s")


if __name__ == "__main__":
    main()
