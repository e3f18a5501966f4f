"""The teacher's learning curve, measured: for every checkpoint of a run, sample the demo's held-out
face and voice and print the lip-sync measure beside ground truth and chance.

    python bench/teacher_curve.py runs/teacher/tb/run/checkpoints [--seconds 4] [--steps 25]
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from datamodules.synthetic import render_clip
from fada_lightning.demo import HELD_OUT_SEED, chance_sync, loudness_table, mouth_sync
from fada_lightning.sample import load_module, sample_video


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", help="a folder of .ckpt files written by `fada fit`")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args()
    ckpts = [c for c in Path(args.checkpoints).glob("*.ckpt") if c.name != "last.ckpt"]
    ckpts.sort(key=lambda c: int(re.findall(r"\d+", c.stem)[-1]))
    size = load_module(ckpts[0]).preset["frame_size"]
    truth, audio, _ = render_clip(HELD_OUT_SEED, "strict", 0, size=size, frames=int(args.seconds * 25))
    print(f"ground truth sync {mouth_sync(truth, audio):+.2f} [{loudness_table(truth, audio)}]")
    print(f"{'checkpoint':>24} {'sync':>6} {'chance':>12} {'pixel err':>9} {'s':>5}  dark mouth pixels quiet/mid/loud")
    for ckpt in ckpts:
        start = time.perf_counter()
        module = load_module(ckpt).eval()
        video, _ = sample_video(module, truth[0], audio, steps=args.steps, progress=False)
        mean, std = chance_sync(video, clips=10)
        err = np.abs(video.astype(float) - truth).mean()
        print(f"{ckpt.name:>24} {mouth_sync(video, audio):+6.2f} {mean:+6.2f}+-{std:.2f} {err:9.1f} "
              f"{time.perf_counter() - start:5.0f}  {loudness_table(video, audio)}", flush=True)


if __name__ == "__main__":
    main()
