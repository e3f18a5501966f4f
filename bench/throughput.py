"""Training throughput with 1 and 2 processes (DDP over gloo), and whether the data pipeline keeps up.

    python bench/throughput.py [--batch 2] [--steps 4] [--clips 48] [--only training|data]

Training: samples per second of the teacher and each distiller on `micro`, every process with the
same batch and one torch thread (2 processes on this machine's 2 cores), from fixed in-memory
batches; scaling efficiency = rate(2) / (2 rate(1)). Each measurement is its own `fit` in a child
process (`--measure`), since Lightning launches DDP's second process by re-running the script.
Data: clips per second the streaming DataModule delivers with 0, 1 and 2 workers, decoding mp4 + wav
or reading `fada cache`'s latents, beside the clips per second one process of teacher training eats.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import StepTimer, fixed_batches  # noqa: E402

from datamodules.streaming import AvatarDataModule  # noqa: E402
from fada_lightning.module import TeacherModule  # noqa: E402

DISTILLERS = {  # name -> (distiller spec, DistillModule options)
    "PeRFlow": ({"class_path": "distillers.perflow.PeRFlow"}, {}),
    "RFlow": ({"class_path": "distillers.rflow.RFlow"}, {}),
    "TCD": ({"class_path": "distillers.tcd.TCD", "init_args": {"mode": "guided"}}, {}),
    "FADA-Balanced": ({"class_path": "distillers.mixed.MixedPeRFlow"}, {}),
    "FADA-Fast": ({"class_path": "distillers.mixed.MixedPeRFlow",
                   "init_args": {"mode": "guided", "ref_scale": [1.0, 3.0], "audio_scale": [1.0, 9.0]}},
                  {"cfg_conditioning": "layer_tokens"}),
}


def measure(row: str, devices: int, batch: int, steps: int, teacher_ckpt: str, out: str) -> None:
    """One `fit` of `row` on `devices` processes; rank 0 writes {"seconds": median s/step} to `out`."""
    from fada_lightning.distill import DistillModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if row == "teacher":
        module = TeacherModule(preset="micro")
    else:
        from lightning.pytorch.cli import instantiate_class

        spec, options = DISTILLERS[row]
        module = DistillModule(teacher_ckpt, instantiate_class((), spec), ema_decay=0.95, **options)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps + 1, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    batches = fixed_batches(module, batch, steps + 1)  # the same batches for every row (same seed, shapes)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps({"seconds": statistics.median(timer.seconds[1:])}))


def training(args, tmp: Path) -> float:
    """Prints the training table; -> the teacher's samples per second on 1 process."""
    teacher = TeacherModule(preset="micro")
    ckpt = tmp / "teacher.ckpt"  # weights do not change the cost: a random teacher
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, ckpt)
    print(f"training: micro, batch {args.batch} per process, 1 thread per process, median of {args.steps} steps")
    print(f"{'':16s} {'1 proc samples/s':>17s} {'2 procs samples/s':>18s} {'efficiency':>11s}")
    rates = {}
    for row in ["teacher", *DISTILLERS]:
        for devices in (1, 2):
            out = tmp / f"{row}-{devices}.json"
            cmd = [sys.executable, __file__, "--measure", row, "--devices", str(devices), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--teacher_ckpt", str(ckpt), "--out", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise SystemExit(f"{row} on {devices} processes failed:\n{done.stderr[-3000:]}")
            rates[row, devices] = devices * args.batch / json.loads(out.read_text())["seconds"]
        one, two = rates[row, 1], rates[row, 2]
        print(f"{row:16s} {one:17.2f} {two:18.2f} {two / (2 * one):10.0%}", flush=True)
    return rates["teacher", 1]


def data_rate(shards, workers: int, clips: int, cached: bool) -> float:
    """Clips per second out of the training DataLoader (the first batch, worker start-up, not timed)."""
    model = TeacherModule(preset="micro")
    data = AvatarDataModule.for_model(model, train_shards=shards, batch_size=4, num_workers=workers,
                                      epoch_samples=clips, cached=cached, shuffle_buffer=16)
    data.trainer = type("T", (), {"lightning_module": model, "global_rank": 0, "world_size": 1,
                                  "current_epoch": 0})()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["audio"])
    return seen / (time.perf_counter() - start)


def data(args, tmp: Path, consumption: float | None) -> None:
    from datamodules.cache import main as cache_main
    from datamodules.synthetic import ensure_dataset

    root = Path(args.root)
    manifest = ensure_dataset(root=str(root), size=32)
    shards = [str(root / p) for p in manifest["strict"]][:4]
    cached = [str(p) for p in cache_main([*shards, "--out", str(tmp / "cached"), "--preset", "micro"])]
    print(f"\ndata: clips per second into training (micro, 32 px, {args.clips} clips, shuffle buffer 16)")
    print(f"{'workers':>8s} {'decode mp4 + wav':>17s} {'cached latents':>15s}")
    for workers in (0, 1, 2):
        decoded = data_rate(shards, workers, args.clips, cached=False)
        latent = data_rate(cached, workers, args.clips, cached=True)
        print(f"{workers:8d} {decoded:17.1f} {latent:15.1f}   ({latent / decoded:.1f}x)", flush=True)
    if consumption is not None:
        print(f"the teacher trains on {consumption:.1f} clips/s on 1 process (batch {args.batch}, 1 thread)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="clips per step per process")
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--clips", type=int, default=48, help="clips timed per data measurement")
    p.add_argument("--root", default="data/synthetic", help="synthetic dataset folder (generated if missing)")
    p.add_argument("--only", choices=["training", "data"])
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--teacher_ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.measure:
        return measure(args.measure, args.devices, args.batch, args.steps, args.teacher_ckpt, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        consumption = training(args, Path(tmp)) if args.only != "data" else None
        if args.only != "training":
            data(args, Path(tmp), consumption)


if __name__ == "__main__":
    main()
