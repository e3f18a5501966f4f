"""Long-video drift: does a model's video wander from its reference face over a minute of speech?

    python bench/drift.py Teacher=TEACHER.ckpt FADA-Fast=exported/fada_fast DMD=DMD.ckpt One-step=ONE.ckpt \
        [--seconds 60] [--segment 10] [--people 2] [--plot docs/results/drift.png] [--save drift.npz]

A model is a `fada fit` checkpoint or a `fada export` folder. Each of --people held-out people of the
synthetic world (its test split, seed 2000: never trained on) gives the reference, their first frame,
and --seconds of their speech; the model makes the whole video in one call (clip windows carrying
motion frames, as `fada sample` does). Per frame, averaged over people:

    identity  colour-histogram distance of each frame to the reference (metrics.synthetic.identity_distance:
              a person's own frames 0.01-0.04, another person 0.48-0.71)
    IQA       the world's no-reference quality (WorldQuality: 1 clean, lower blurred or noisy)

The table gives the first clip window (made from the reference alone) and then each --segment
seconds. The rendered truth is a row too (no drift by construction), and so is the truth with pixel
noise of std 10 and 20 levels (of 255), a scale for the distances. A palette shift moves the identity
distance as noise does; the mean colour shift of each model's frames against the truth's tells them
apart. Drift is a segment worse than the first window. The last lines say by how much, and from which
second every later second stays more than 0.02 worse (onsets are read on 1 s means, so drift inside
the first segment shows).
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
NOISE_LEVELS = (10, 20)  # std of the pixel noise of the reference rows, in levels of 255


def with_noise(frames: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 frames plus Gaussian pixel noise of `std` levels, clipped to uint8."""
    noise = np.random.default_rng(seed).normal(0, std, frames.shape)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)


def colour_shift(frames: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(3,) mean R, G, B of `frames` minus the truth's, in levels (both (T, H, W, 3) uint8)."""
    return frames.reshape(-1, 3).mean(0) - truth.reshape(-1, 3).mean(0)


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


def series_of(frames: np.ndarray, reference: np.ndarray, quality: WorldQuality) -> np.ndarray:
    """(2, T): identity distance to the reference and IQA of each frame of one video (T, H, W, 3) uint8."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1)[None]
    iqa = torch.cat([quality(part) for part in video.split(250, dim=1)]).numpy()
    return np.stack([identity_distance(frames, reference), iqa])


def bin_means(values: np.ndarray, edges: list[int]) -> np.ndarray:
    """(..., T) per-frame values -> (..., len(edges) - 1) means over frames [edges[k], edges[k + 1])."""
    return np.stack([values[..., a:b].mean(-1) for a, b in zip(edges[:-1], edges[1:])], -1)


def edges_of(frames: int, step: int) -> list[int]:
    """Frame edges of consecutive `step`-frame bins over `frames` frames (the last may be short)."""
    return list(range(0, frames, step)) + [frames]


def onset(series: np.ndarray, baseline: float, floor: float, sign: int) -> int | None:
    """The first bin from which every later one is worse than `baseline` by more than `floor`
    (worse: higher for sign +1, lower for -1), or None."""
    return next((k for k in range(len(series)) if all(sign * (series[k:] - baseline) > floor)), None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=PATH: a checkpoint or an exported folder")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--segment", type=float, default=10.0, help="seconds per segment")
    p.add_argument("--people", type=int, default=2, help="held-out people (test-split clips) per model")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--plot", default=None, help="write the two curves per model to this PNG")
    p.add_argument("--save", default=None, help="write each model's per-frame identity and IQA (2, T) to this .npz")
    args = p.parse_args(argv)
    models = [m.split("=", 1) for m in args.models]
    if any(len(m) != 2 for m in models):
        raise SystemExit("drift: give each model as NAME=PATH")

    frames = int(round(args.seconds * FPS))
    segments, seconds = edges_of(frames, int(round(args.segment * FPS))), edges_of(frames, FPS)
    rows, colours, window = {}, {}, None
    for name, path in models:
        pipe = load_pipeline(path)
        size, window = pipe.config.frame_size, pipe.config.clip_frames
        quality = WorldQuality(size=size)
        people = [render_clip(TEST_SEED, "strict", i, size=size, frames=frames) for i in range(args.people)]
        if "Truth" not in rows:
            rows["Truth"] = np.mean([series_of(video, video[0], quality) for video, _, _ in people], 0)
            for std in NOISE_LEVELS:
                rows[f"Truth + noise {std}"] = np.mean(
                    [series_of(with_noise(video, std, seed=i), video[0], quality) for i, (video, _, _) in
                     enumerate(people)], 0)
        start, made, shifts = time.perf_counter(), [], []
        for video, wav, _ in people:
            out = pipe(video[0], wav, generator=torch.Generator().manual_seed(args.seed))
            made.append(series_of(out.frames, video[0], quality))
            shifts.append(colour_shift(out.frames, video[:len(out.frames)]))
        rows[name], colours[name] = np.mean(made, 0), np.mean(shifts, 0)
        print(f"{name}: {args.people} x {args.seconds:g} s in {time.perf_counter() - start:.0f} s", flush=True)

    names = ["window 1"] + [f"{a / FPS:g}-{b / FPS:g}s" for a, b in zip(segments[:-1], segments[1:])]
    table = {name: np.concatenate([bin_means(v, [0, window]), bin_means(v, segments)], -1) for name, v in rows.items()}
    for i, metric in enumerate(("identity distance to the reference (lower: closer)", "IQA (higher: cleaner)")):
        print(f"\n{metric}, mean over {args.people} people; window 1: the first {window} frames")
        print(f"{'model':<24}" + "".join(f"{e:>10}" for e in names))
        for name, values in table.items():
            print(f"{name:<24}" + "".join(f"{v:>10.3f}" for v in values[i]))
    print()
    print(f"mean colour shift against the truth (R, G, B levels of 255), mean over {args.people} people")
    for name, shift in colours.items():
        print(f"{name:<24}" + "".join(f"{v:>+8.1f}" for v in shift))
    print()
    for name, values in rows.items():
        if name.startswith("Truth"):
            continue
        per_second = bin_means(values, seconds)
        said = []
        for i, (metric, sign) in enumerate((("identity", +1), ("IQA", -1))):
            first, last = table[name][i, 0], table[name][i, -1]
            k = onset(per_second[i], first, 0.02, sign)
            said.append(f"{metric} {first:.3f} -> {last:.3f} ({last - first:+.3f}), worse by 0.02 "
                        + (f"from {k}-{k + 1} s on" if k is not None else "at no point"))
        print(f"{name}: " + "; ".join(said))
    if args.save:
        np.savez(args.save, fps=FPS, window=window, **rows)
        print(f"wrote {args.save}")
    if args.plot:
        plot(rows, window, args.plot)
        print(f"wrote {args.plot}")


def plot(rows: dict[str, np.ndarray], window: int, path: str) -> None:
    """1 s means of both per-frame series of each model, the first window's mean as a marker at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    greys = ("0.4", "0.65")
    truth_styles = {"Truth": ("--", "k")} | {f"Truth + noise {s}": (":", g) for s, g in zip(NOISE_LEVELS, greys)}
    for name, values in rows.items():
        per_second = bin_means(values, edges_of(values.shape[1], FPS))
        mids = np.arange(per_second.shape[1]) + 0.5
        style, colour = truth_styles.get(name, ("-", None))
        for ax, series, first in zip(axes, per_second, bin_means(values, [0, window])[:, 0]):
            line, = ax.plot(mids, series, style, label=name, color=colour)
            if not name.startswith("Truth +"):
                ax.plot([0], [first], "o", color=line.get_color())
    for ax, title in zip(axes, ("identity distance to the reference", "IQA")):
        ax.set_xlabel("seconds into the video (dot: the first window)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
