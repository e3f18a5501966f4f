"""Long-video drift: does a model's video wander from its reference face over a minute of speech?

    python bench/drift.py Teacher=TEACHER.ckpt FADA-Fast=exported/fada_fast DMD=DMD.ckpt One-step=ONE.ckpt \
        [--seconds 60] [--segment 10] [--people 2] [--plot docs/results/drift.png]

A model is a `fada fit` checkpoint or a `fada export` folder. Each of --people held-out people of the
synthetic world (its test split, seed 2000: never trained on) gives the reference, their first frame,
and --seconds of their speech; the model makes the whole video in one call (clip windows carrying
motion frames, as `fada sample` does). Per --segment seconds, averaged over frames and people:

    identity  colour-histogram distance of each frame to the reference (metrics.synthetic.identity_distance:
              a person's own frames 0.01-0.04, another person 0.48-0.71)
    IQA       the world's no-reference quality (WorldQuality: 1 clean, lower blurred or noisy)

The rendered truth is a row too (no drift by construction). Drift shows as identity rising or IQA
falling from the first segment on; the last lines say by how much and from which segment.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import render_clip  # noqa: E402
from fada_lightning.metrics.synthetic import WorldQuality, identity_distance  # noqa: E402
from fada_lightning.pipeline import FadaAvatarPipeline  # noqa: E402

FPS, TEST_SEED = 25, 2000


def load_pipeline(path: str) -> FadaAvatarPipeline:
    """An exported folder, or a checkpoint turned into its pipeline as `fada export` would."""
    if (Path(path) / "model_index.json").is_file():
        pipe = FadaAvatarPipeline.from_pretrained(path)
    else:
        from fada_lightning.export import pipeline_of
        from fada_lightning.sample import load_module

        pipe = pipeline_of(load_module(path).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def segment_means(values: np.ndarray, frames_per_segment: int) -> np.ndarray:
    """(T,) per-frame values -> (ceil(T / n),) means of consecutive n-frame segments (the last may be short)."""
    return np.array([values[i:i + frames_per_segment].mean() for i in range(0, len(values), frames_per_segment)])


def drift_of(frames: np.ndarray, reference: np.ndarray, quality: WorldQuality, per_segment: int) -> np.ndarray:
    """(2, segments): identity distance and IQA per segment of one video (T, H, W, 3) uint8."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1)[None]
    iqa = torch.cat([quality(part) for part in video.split(250, dim=1)]).numpy()
    return np.stack([segment_means(identity_distance(frames, reference), per_segment),
                     segment_means(iqa, per_segment)])


def onset(series: np.ndarray, floor: float, sign: int) -> int | None:
    """The first segment from which every later one is worse than the first by more than `floor`
    (worse: higher for sign +1, lower for -1), or None."""
    return next((k for k in range(1, len(series)) if all(sign * (series[k:] - series[0]) > floor)), None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=PATH: a checkpoint or an exported folder")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--segment", type=float, default=10.0, help="seconds per segment")
    p.add_argument("--people", type=int, default=2, help="held-out people (test-split clips) per model")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--plot", default=None, help="write the two curves per model to this PNG")
    args = p.parse_args(argv)
    models = [m.split("=", 1) for m in args.models]
    if any(len(m) != 2 for m in models):
        raise SystemExit("drift: give each model as NAME=PATH")

    frames, per_segment = int(round(args.seconds * FPS)), int(round(args.segment * FPS))
    rows = {}
    for name, path in models:
        pipe = load_pipeline(path)
        size = pipe.config.frame_size
        quality = WorldQuality(size=size)
        people = [render_clip(TEST_SEED, "strict", i, size=size, frames=frames) for i in range(args.people)]
        if "Truth" not in rows:
            rows["Truth"] = np.mean([drift_of(video, video[0], quality, per_segment) for video, _, _ in people], 0)
        start, made = time.perf_counter(), []
        for video, wav, _ in people:
            out = pipe(video[0], wav, generator=torch.Generator().manual_seed(args.seed))
            made.append(drift_of(out.frames, video[0], quality, per_segment))
        rows[name] = np.mean(made, 0)
        print(f"{name}: {args.people} x {args.seconds:g} s in {time.perf_counter() - start:.0f} s", flush=True)

    edges = [f"{k * args.segment:g}-{min((k + 1) * args.segment, args.seconds):g}s"
             for k in range(len(rows["Truth"][0]))]
    for i, metric in enumerate(("identity distance to the reference (lower: closer)", "IQA (higher: cleaner)")):
        print(f"\n{metric}, mean over {args.people} people")
        print(f"{'model':<24}" + "".join(f"{e:>10}" for e in edges))
        for name, values in rows.items():
            print(f"{name:<24}" + "".join(f"{v:>10.3f}" for v in values[i]))
    print()
    for name, (identity, iqa) in rows.items():
        if name == "Truth":
            continue
        k_id = onset(identity, 0.02, +1)
        k_iqa = onset(iqa, 0.02, -1)
        print(f"{name}: identity {identity[0]:.3f} -> {identity[-1]:.3f} ({identity[-1] - identity[0]:+.3f}), "
              f"IQA {iqa[0]:.3f} -> {iqa[-1]:.3f} ({iqa[-1] - iqa[0]:+.3f}); drift beyond 0.02 from "
              f"{edges[k_id] if k_id is not None else 'no segment'} (identity), "
              f"{edges[k_iqa] if k_iqa is not None else 'no segment'} (IQA)")
    if args.plot:
        plot(rows, args.segment, args.plot)
        print(f"wrote {args.plot}")


def plot(rows: dict[str, np.ndarray], segment: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, values in rows.items():
        mids = (np.arange(values.shape[1]) + 0.5) * segment
        for ax, series in zip(axes, values):
            ax.plot(mids, series, "--" if name == "Truth" else "-o", label=name, color="k" if name == "Truth" else None)
    for ax, title in zip(axes, ("identity distance to the reference", "IQA")):
        ax.set_xlabel("seconds into the video")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
