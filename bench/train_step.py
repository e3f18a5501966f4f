"""Seconds per training step of the teacher and of each distiller, on `micro` at the same batch, in one run.

    python bench/train_step.py [--batch 4] [--steps 4]

Each row is a real Lightning `fit` on the same fixed in-memory batches (no decoding), timed from
batch start to batch end after one warm-up step: forward, backward, optimizer and EMA. The
`teacher passes` column counts the frozen networks' forward passes per training clip (the teacher's
window solve, x 3 with guidance in the target; TCD adds one pass of the student's EMA), which is
what separates the distillers' costs. Weights do not change the cost: the teacher is random.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from distillers.mixed import MixedPeRFlow
from distillers.perflow import PeRFlow
from distillers.rflow import RFlow
from distillers.tcd import TCD
from fada_lightning.distill import DistillModule
from fada_lightning.module import TeacherModule
from fada_lightning.scaling import PassCounter


class StepTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)


def fixed_batches(module, batch_size: int, count: int) -> list[dict]:
    size, frames = module.preset["frame_size"], module.hparams.clip_frames
    a, m = module.preset["net"]["audio"], module.hparams.motion_frames
    g = torch.Generator().manual_seed(0)
    return [dict(frames=torch.rand(batch_size, frames, 3, size, size, generator=g) * 2 - 1,
                 motion=torch.rand(batch_size, m, 3, size, size, generator=g) * 2 - 1,
                 ref=torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
                 audio=torch.randn(batch_size, frames, a["window"], a["layers"], a["dim"], generator=g),
                 tier=[("strict", "lenient")[i % 2] for i in range(batch_size)])
            for _ in range(count)]


def time_steps(module, batches: list[dict]) -> tuple[float, float]:
    """(median seconds per step after the first, frozen-network passes per clip)."""
    timer = StepTimer()
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer])
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    frozen = []
    if isinstance(module, DistillModule):  # the EMA runs in training only as a target network (TCD)
        module.load_teacher()
        frozen = [module.teacher, *([module.ema.module] if module.ema is not None else [])]
    with PassCounter(*frozen) as counter:
        trainer.fit(module, loader)
    passes = counter.rows / (len(batches) * len(batches[0]["ref"]))
    return statistics.median(timer.seconds[1:]), passes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="clips per training step (the same for every row)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per row (after one warm-up step)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(0)
    teacher = TeacherModule(preset="micro", ema_decay=0.999)
    distillers = [
        ("PeRFlow balanced (K 4, N 8)", lambda: PeRFlow(mode="balanced")),
        ("PeRFlow guided (K 4, N 8)", lambda: PeRFlow(mode="guided")),
        ("RFlow balanced (K 1, N 32)", lambda: RFlow(mode="balanced")),
        ("TCD guided (1 step + EMA)", lambda: TCD(mode="guided")),
        ("TCD balanced (1 step + EMA)", lambda: TCD(mode="balanced")),
        ("FADA-Balanced (mixed, 2B)", lambda: MixedPeRFlow(mode="balanced")),
        ("FADA-Fast (guided, CFG tokens)", lambda: MixedPeRFlow(mode="guided", ref_scale=(1.0, 3.0),
                                                                   audio_scale=(1.0, 9.0))),
    ]
    options = {"FADA-Fast (guided, CFG tokens)": {"cfg_conditioning": "layer_tokens"}}
    batches = fixed_batches(teacher, args.batch, args.steps + 1)
    print(f"micro preset, batch {args.batch} clips of {teacher.hparams.clip_frames} frames, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'':32s} {'teacher passes':>15s} {'s/step':>8s} {'vs teacher':>11s}")
    base, _ = time_steps(teacher, batches)
    print(f"{'teacher (Eq 1)':32s} {'-':>15s} {base:8.3f} {1:10.2f}x", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the students read the teacher's settings from a checkpoint
        path = str(Path(tmp) / "teacher.ckpt")
        torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
        for name, make in distillers:
            module = DistillModule(path, make(), ema_decay=0.95, **options.get(name, {}))
            seconds, passes = time_steps(module, batches)
            print(f"{name:32s} {passes:15g} {seconds:8.3f} {seconds / base:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
