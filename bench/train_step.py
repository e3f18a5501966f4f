"""Seconds per training step of the teacher and of each distiller, on `micro` at the same batch, in one run.

    python bench/train_step.py [--batch 4] [--steps 4]

Each row is a real Lightning `fit` on the same fixed in-memory batches (no decoding), timed from
batch start to batch end after one warm-up step: forward, backward, optimizer and EMA. The
`teacher passes` column counts the frozen networks' forward passes per training clip (the teacher's
window solve, x 3 with guidance in the target; TCD adds one pass of the student's EMA), which is
what separates the distillers' costs. DMD's steps are of two kinds (F alone, or G then F: G steps
once every `two_time_scale`, 2 here so both kinds are timed), each timed on its own; G's update
costs their difference. Weights do not change the cost: the teacher is random.
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

from distillers.dmd import DMD
from distillers.mixed import MixedPeRFlow
from distillers.perflow import PeRFlow
from distillers.rflow import RFlow
from distillers.tcd import TCD
from fada_lightning.distill import DistillModule
from fada_lightning.module import TeacherModule
from fada_lightning.scaling import PassCounter


class StepTimer(L.Callback):
    """Seconds of each training step, by the networks it updated ("student", "student + fake_score", ...)."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        kind = " + ".join(getattr(module, "_updated", None) or ["student"])
        if trainer.global_step > 1:  # after the warm-up step
            self.seconds.setdefault(kind, []).append(time.perf_counter() - self._start)


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


def time_steps(module, batches: list[dict]) -> tuple[dict[str, float], float]:
    """({kind of step: median seconds after the first step}, frozen-network passes per clip)."""
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
    return {kind: statistics.median(t) for kind, t in timer.seconds.items()}, passes


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
        ("DMD (G every 2nd step)", lambda: DMD(two_time_scale=2)),
    ]
    options = {"FADA-Fast (guided, CFG tokens)": {"cfg_conditioning": "layer_tokens"}}
    batches = fixed_batches(teacher, args.batch, args.steps + 1)
    print(f"micro preset, batch {args.batch} clips of {teacher.hparams.clip_frames} frames, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'':44s} {'teacher passes':>15s} {'s/step':>8s} {'vs teacher':>11s}")
    (base,) = time_steps(teacher, batches)[0].values()
    print(f"{'teacher (Eq 1)':44s} {'-':>15s} {base:8.3f} {1:10.2f}x", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the students read the teacher's settings from a checkpoint
        path = str(Path(tmp) / "teacher.ckpt")
        torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
        for name, make in distillers:
            module = DistillModule(path, make(), ema_decay=0.95, **options.get(name, {}))
            seconds, passes = time_steps(module, batches)
            for kind, t in sorted(seconds.items(), key=lambda item: item[1]):
                label = name if len(seconds) == 1 else f"{name}: {kind}"
                print(f"{label:44s} {passes:15.3g} {t:8.3f} {t / base:10.2f}x", flush=True)
            if len(seconds) == 2:  # G's update alone: the step with it less the step without
                print(f"{name + ': student update alone':44s} {'':15s} {max(seconds.values()) - min(seconds.values()):8.3f}")


if __name__ == "__main__":
    main()
