"""What a few-step student's first step makes: its x0 from pure noise at t = 999, against the teacher's.

    python bench/first_step.py runs/ablation/distillers/DMD_4_NFE/seed0/tb/run/checkpoints/best.ckpt \
        [more student checkpoints sampled the same way (TurboTalk's)] [--clips 8] [--steps 1 2 4]

For each checkpoint and number of steps, on the same held-out clips and noise: the frames' grain, the
mean absolute Laplacian in pixel levels (real frames about 25; speckle raises it), and the MSE to the
real frames. The last rows put the first checkpoint's teacher weights in the same sampler (unguided,
one pass a step), to separate what distillation did from what the teacher already predicts at t = 999,
and print the teacher's min-SNR training weight there against its largest.
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch.utils.data import DataLoader

from fada_lightning.diffusion import schedule as S
from fada_lightning.evaluate import eval_clips
from fada_lightning.sample import load_module


def grain(video: torch.Tensor) -> float:
    """Mean |4-neighbour Laplacian| of (..., H, W) frames in [-1, 1], in pixel levels (0-255)."""
    x = (video.clamp(-1, 1) + 1) * 127.5
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.abs().mean().item()


def rows(module, batch: dict, steps: list[int]):
    for n in steps:
        video, _ = module.generate(batch["ref"], batch["audio"], n, generator=torch.Generator().manual_seed(0))
        yield n, grain(video), (video - batch["frames"]).pow(2).mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="few-step student checkpoints (DMD's, TurboTalk's)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--data", default="data/synthetic", help="the synthetic world's root (its test split)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    modules = [load_module(path).eval() for path in args.ckpts]
    dataset, _ = eval_clips(modules[0], args.clips, args.frames, None, {"root": args.data})
    batch = next(iter(DataLoader(dataset, batch_size=args.clips)))
    print(f"{args.clips} held-out clips x {args.frames} frames; grain = mean |Laplacian| (pixel levels)")
    print(f"{'model':52s} {'steps':>5s} {'grain':>7s} {'MSE':>8s}")
    print(f"{'real frames':52s} {'':>5s} {grain(batch['frames']):7.1f}")
    for path, module in zip(args.ckpts, modules):
        for n, g, mse in rows(module, batch, args.steps):
            print(f"{path[-52:]:52s} {n:5d} {g:7.1f} {mse:8.4f}", flush=True)
    student = modules[0]
    student.load_teacher()
    student.sampling_net.load_state_dict(student.teacher.state_dict())
    for n, g, mse in rows(student, batch, args.steps):
        print(f"{'teacher weights, same sampler (unguided)':52s} {n:5d} {g:7.1f} {mse:8.4f}", flush=True)
    teacher = torch.load(student.hparams.teacher_ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    weight = S.min_snr_weight(student.alphas_cumprod.float(), teacher.get("min_snr_gamma"), student.hparams.prediction_type)
    print(f"teacher's min-SNR weight at t = 999: {weight[-1]:.4f}, largest {weight.max():.4f} "
          f"(t = {int(weight.argmax())}): the step that starts from noise was trained "
          f"{weight.max() / weight[-1]:.0f}x less")


if __name__ == "__main__":
    main()
