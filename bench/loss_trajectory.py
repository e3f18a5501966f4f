"""Loss trajectories of the bundled distillers on one seed: the check that a change to the training
loop keeps every method's numbers (run it before and after, and compare).

    python -m bench.loss_trajectory [--steps 8] [--out trajectory.json]

A random narrow `micro` teacher, 8 fixed random batches of 2 clips, lr 1e-3, no warm-up; the
distillers at the bundled configs' settings with cheap solves (2 teacher steps a window).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from distillers.mixed import MixedPeRFlow
from distillers.perflow import PeRFlow
from distillers.rflow import RFlow
from distillers.tcd import TCD
from fada_lightning.distill import DistillModule
from fada_lightning.module import TeacherModule
from fada_lightning.presets import load_preset

DISTILLERS = {
    "perflow": lambda: PeRFlow(solver_steps=2),
    "perflow_guided_ranges": lambda: PeRFlow(solver_steps=2, mode="guided", ref_scale=(1.0, 3.0), audio_scale=(1.0, 9.0)),
    "rflow": lambda: RFlow(solver_steps=4),
    "tcd": lambda: TCD(),
    "mixed": lambda: MixedPeRFlow(solver_steps=2),
}


def batches(n: int, b: int = 2, f: int = 4, m: int = 2, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [dict(frames=torch.rand(b, f, 3, size, size, generator=g) * 2 - 1,
                 motion=torch.rand(b, m, 3, size, size, generator=g) * 2 - 1,
                 ref=torch.rand(b, 3, size, size, generator=g) * 2 - 1,
                 audio=torch.randn(b, f, 5, 1, 128, generator=g), tier=["strict", "lenient"][:b]) for _ in range(n)]


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    preset = load_preset("micro")
    preset["net"]["unet"]["block_out_channels"] = [32, 32, 64]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        teacher = TeacherModule(preset=preset, ema_decay=None, clip_frames=4)
        path = Path(tmp) / "teacher.ckpt"
        torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams),
                    "fada_role": "teacher"}, path)
        data = batches(args.steps)
        for name, make in DISTILLERS.items():
            torch.manual_seed(0)
            model = DistillModule(str(path), make(), lr=1e-3, warmup_steps=1, ema_decay=0.9)
            record = Losses()
            trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_checkpointing=False, enable_model_summary=False, callbacks=[record],
                                default_root_dir=tmp)
            trainer.fit(model, DataLoader(data, batch_size=None))
            results[name] = record.losses
            print(f"{name:24s} " + " ".join(f"{x:.6f}" for x in record.losses), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
