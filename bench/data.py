"""Data-side throughput on the synthetic shards: clips per second one data worker decodes.

    python bench/data.py [--root data/synthetic] [--clips 200]

Each column is a function (shards, n) -> clips per second; add one to COLUMNS to compare
(e.g. the clips per second the teacher consumes in a training step).
"""
from __future__ import annotations

import argparse
import time

import torch

from datamodules.audio_features import LogMelFeatures
from datamodules.streaming import ClipDecoder, ClipStream
from datamodules.synthetic import ensure_dataset


def decode_rate(shards: list[str], n: int, clip_frames: int = 8, motion_frames: int = 2) -> float:
    """Clips per second through the full decode step (tar read, decord mp4 + wav, log-mel
    features, audio windows) in one process with one torch thread, as in a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decoder = ClipDecoder(LogMelFeatures(), clip_frames, motion_frames)
        stream = ClipStream(shards, decoder, samples_per_worker=n, num_workers=1)
        warmup = ClipStream(shards, decoder, samples_per_worker=min(n, 4), num_workers=1, seed=1)
        for _ in warmup:  # first decord / torchaudio calls pay one-off setup costs
            pass
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


COLUMNS = [("decode (clips/s per worker)", decode_rate)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/synthetic", help="synthetic dataset folder (generated if missing)")
    parser.add_argument("--clips", type=int, default=200, help="clips timed per column")
    args = parser.parse_args(argv)
    manifest = ensure_dataset(args.root)
    shards = [f"{args.root}/{p}" for p in manifest["strict"]]
    print(f"# {len(shards)} strict shards, {manifest['size']}x{manifest['size']} px, "
          f"{manifest['clip_frames']} frames per clip; clips of 8 frames + 2 motion frames")
    for name, column in COLUMNS:
        print(f"{name}: {column(shards, args.clips):.1f}")


if __name__ == "__main__":
    main()
