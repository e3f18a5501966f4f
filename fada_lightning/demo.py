"""`make demo`: synthetic data -> the `micro` teacher -> its PeRFlow student -> talking-head mp4s
from a face and a voice neither saw, with the cost (NFE, wall time) and honest measures of how
well the mouth follows the audio, for the teacher, the teacher at the student's budget, and the student.
`--one-step` (`make demo-one-step`) distils TurboTalk's way instead: teacher -> DMD (4 steps of one
pass) -> adversarial 4 -> 1 (one pass per clip window), and compares all of them at their budgets.

    python -m fada_lightning.demo [--steps N] [--distill-steps N] [--out runs/demo] [--retrain]
    python -m fada_lightning.demo --one-step [--dmd-steps N] [--one-step-steps N]
"""
from __future__ import annotations

import argparse
import json
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
DISTILL_STEPS = 100
DMD_STEPS, ONE_STEP_STEPS = 200, 100
MICRO_LR = "0.0001"  # the micro students' lr (tables/distillers.yaml), not SD1.5's 1e-5


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


def _fit(config: str, root: Path, steps: int, *overrides: str) -> Path:
    """`fada fit` into root/tb/demo; returns its last checkpoint."""
    shutil.rmtree(root, ignore_errors=True)
    cli.main(["fit", "--config", config, f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root}",
              f"--trainer.logger.init_args.save_dir={root}", "--trainer.logger.init_args.version=demo",
              f"--trainer.val_check_interval={min(250, steps)}", *overrides])
    return root / "tb" / "demo" / "checkpoints" / "last.ckpt"


def _reuse(ckpt: Path, retrain: bool, newer_than: Path | None = None) -> bool:
    fresh = ckpt.exists() and not retrain and (newer_than is None or ckpt.stat().st_mtime > newer_than.stat().st_mtime)
    if fresh:
        print(f"[demo] reusing {ckpt} (--retrain, or delete it, to train again)")
    return fresh


def train_teacher(out: Path, steps: int, retrain: bool) -> Path:
    ckpt = out / "teacher" / "tb" / "demo" / "checkpoints" / "last.ckpt"
    return ckpt if _reuse(ckpt, retrain) else _fit("teacher.yaml", out / "teacher", steps)


def distil(out: Path, name: str, config: str, teacher: Path, steps: int, retrain: bool, *overrides: str,
           after: Path | None = None) -> Path:
    """`fada fit --config <config>` of a student of `teacher` into out/name (reused if newer than `after`)."""
    ckpt = out / name / "tb" / "demo" / "checkpoints" / "last.ckpt"
    if _reuse(ckpt, retrain, newer_than=after or teacher):
        return ckpt
    checkpoint = {"class_path": "fada_lightning.callbacks.FinalCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": steps, "filename": "step{step:06d}",
                                "auto_insert_metric_name": False}}
    return _fit(config, out / name, steps, f"--model.init_args.teacher_ckpt={teacher}",
                f"--trainer.callbacks={json.dumps([checkpoint])}", *overrides)


def distil_student(out: Path, teacher: Path, steps: int, retrain: bool) -> Path:
    return distil(out, "perflow", "distill_perflow.yaml", teacher, steps, retrain)


def distil_one_step(out: Path, teacher: Path, dmd_steps: int, steps: int, retrain: bool) -> tuple[Path, Path]:
    """TurboTalk's two stages: DMD to 4 steps (F and G at the micro lr), then adversarial 4 -> 1 from it
    (G at the micro lr, D at 10x), its progressive schedule reaching one step halfway. -> (the DMD
    student, the one-step student)."""
    dmd = distil(out, "dmd", "distill_dmd.yaml", teacher, dmd_steps, retrain, f"--model.init_args.lr={MICRO_LR}",
                 f"--model.init_args.distiller.init_args.fake_lr={MICRO_LR}")
    one_step = distil(out, "turbo", "distill_turbo.yaml", teacher, steps, retrain, f"--model.init_args.student_ckpt={dmd}",
                      f"--model.init_args.lr={MICRO_LR}", "--model.init_args.distiller.init_args.d_lr=0.001",
                      f"--model.init_args.distiller.init_args.step_schedule.init_args.ramp_steps={steps // 2}",
                      after=dmd)
    return dmd, one_step


def main(argv=None):
    p = argparse.ArgumentParser(prog="fada demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="teacher training steps (about 1 s each here)")
    p.add_argument("--distill-steps", type=int, default=DISTILL_STEPS, help="PeRFlow distillation steps")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the held-out speech clip")
    p.add_argument("--retrain", action="store_true", help="train the teacher and the student anew")
    p.add_argument("--one-step", action="store_true",
                   help="teacher -> DMD (4 NFE) -> adversarial one-step student (1 NFE), TurboTalk's stages")
    p.add_argument("--dmd-steps", type=int, default=DMD_STEPS, help="DMD steps (G steps every 5th)")
    p.add_argument("--one-step-steps", type=int, default=ONE_STEP_STEPS, help="adversarial 4 -> 1 steps")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    teacher = train_teacher(out, args.steps, args.retrain)
    trained = time.perf_counter()
    if args.one_step:
        dmd, student = distil_one_step(out, teacher, args.dmd_steps, args.one_step_steps, args.retrain)
    else:
        student = distil_student(out, teacher, args.distill_steps, args.retrain)
    distilled = time.perf_counter()

    frames = int(args.seconds * 25)
    size = torch.load(teacher, map_location="cpu", weights_only=False, mmap=True)["hyper_parameters"]["preset"]["frame_size"]
    truth, audio, _ = render_clip(HELD_OUT_SEED, "strict", 0, size=size, frames=frames)
    face, speech = out / "face.png", out / "speech.wav"
    Image.fromarray(truth[0]).save(face)
    write_atomic(speech, encode_wav(audio))
    print(f"[demo] sampling {args.seconds:g} s of speech for a face neither model saw, with each model")
    rows = [("teacher, DDIM 25 steps", teacher, None, "teacher_sample.mp4")]
    if args.one_step:
        rows += [("teacher, DDIM 1 step", teacher, 1, "teacher_1step_sample.mp4"),
                 ("DMD student, 4 steps", dmd, None, "dmd_sample.mp4"),
                 ("DMD student, 1 step", dmd, 1, "dmd_1step_sample.mp4"),
                 ("one-step student", student, None, "one_step_sample.mp4")]
    else:
        rows += [("teacher, DDIM 6 steps", teacher, 6, "teacher_6step_sample.mp4"),
                 ("PeRFlow student, 6 steps", student, None, "perflow_sample.mp4")]
    results = []
    for name, ckpt, steps, file in rows:
        done = sample.sample_file(ckpt, face, speech, out / file, steps=steps, progress=False)
        results.append((name, done, decord.VideoReader(done["output"])[:].asnumpy()))
    reference = results[0][2]

    print("\n==== fada-lightning demo ====")
    print(f"teacher checkpoint : {teacher}")
    print(f"student checkpoint : {student}")
    print(f"TensorBoard logs   : {out}   (tensorboard --logdir {out})")
    print(f"reference / audio  : {face} / {speech}")
    print(f"ground truth sync  : {mouth_sync(truth, audio):+.2f}   [{loudness_table(truth, audio)}]")
    print("sync = correlation of dark mouth pixels with loudness per frame (1: the mouth opens with the voice);")
    print("pixel error = mean |difference| on 0-255 against the ground-truth video / the 25-step teacher's sample")
    print(f"{'':26s} {'NFE':>4s} {'seconds':>8s} {'speed-up':>8s} {'sync':>6s} {'chance':>12s} "
          f"{'vs truth':>8s} {'vs teacher':>10s}  video")
    for name, done, video in results:
        chance_mean, chance_std = chance_sync(video)
        print(f"{name:26s} {done['nfe']:4g} {done['seconds']:8.1f} {results[0][1]['seconds'] / done['seconds']:7.1f}x "
              f"{mouth_sync(video, audio):+6.2f} {chance_mean:+6.2f}+-{chance_std:.2f} "
              f"{np.abs(video.astype(float) - truth).mean():8.1f} {np.abs(video.astype(float) - reference).mean():10.1f}"
              f"  {done['output']}")
    print("(chance = the sample against 30 other voices' loudness; NFE per clip window of 8 frames)")
    print(f"time: teacher {trained - start:.0f} s, distillation {distilled - trained:.0f} s, "
          f"sampling and measuring {time.perf_counter() - distilled:.0f} s")


if __name__ == "__main__":
    main()
