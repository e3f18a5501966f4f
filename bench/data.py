"""Is the data pipeline fast enough? Clips per second one data worker decodes, beside clips per
second the `micro` teacher consumes in training, in one run.

    python bench/data.py [--root data/synthetic] [--clips 200] [--steps 10]

Each column is a function (shards, n) -> clips per second.
"""
from __future__ import annotations

import argparse
import time

import torch

from datamodules.audio_features import LogMelFeatures
from datamodules.clips import ClipDecoder
from datamodules.streams import ClipStream
from datamodules.synthetic import ensure_dataset


def decode_rate(shards: list[str], n: int, clip_frames: int = 8, motion_frames: int = 2, frame_size: int = 32) -> float:
    """Clips per second through the full decode step (tar read, mp4 in the decode server + wav, log-mel
    features, audio windows) in one process with one torch thread, as in a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decoder = ClipDecoder(LogMelFeatures(), clip_frames, motion_frames, frame_size=frame_size)
        stream = ClipStream(shards, decoder, samples_per_worker=n, num_workers=1)
        warmup = ClipStream(shards, decoder, samples_per_worker=min(n, 4), num_workers=1, seed=1)
        for _ in warmup:  # the decode server's start and first torchaudio calls pay one-off setup costs
            pass
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def teacher_rate(shards: list[str], steps: int, batch_size: int = 8) -> float:
    """Clips per second the `micro` teacher consumes: a full training step (codec, forward,
    backward, AdamW, EMA) on a real decoded batch, all torch threads, data already in memory."""
    from fada_lightning.module import TeacherModule

    torch.manual_seed(0)
    model = TeacherModule(preset="micro")
    decoder = ClipDecoder(model.audio_features, model.hparams.clip_frames, model.hparams.motion_frames,
                          frame_size=model.preset["frame_size"])
    items = list(ClipStream(shards, decoder, samples_per_worker=batch_size, num_workers=1))
    batch = torch.utils.data.default_collate(items)
    optimizer = model.configure_optimizers()["optimizer"]

    def step(i):
        loss = model.training_step(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_train_batch_end(None, batch, i)

    model.log = lambda *a, **k: None  # no Trainer here
    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    return steps * batch_size / (time.perf_counter() - start)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/synthetic", help="synthetic dataset folder (generated if missing)")
    parser.add_argument("--size", type=int, default=32, help="frame size (the micro preset's is 32)")
    parser.add_argument("--clips", type=int, default=200, help="clips timed for decoding")
    parser.add_argument("--steps", type=int, default=10, help="teacher training steps timed")
    args = parser.parse_args(argv)
    manifest = ensure_dataset(args.root, size=args.size)
    shards = [f"{args.root}/{p}" for p in manifest["strict"]]
    print(f"# {len(shards)} strict shards, {manifest['size']}x{manifest['size']} px, "
          f"{manifest['clip_frames']} frames per clip; clips of 8 frames + 2 motion frames")
    decoded = decode_rate(shards, args.clips, frame_size=args.size)
    consumed = teacher_rate(shards, args.steps)
    print(f"decode, clips/s per data worker (1 thread) : {decoded:8.1f}")
    print(f"micro teacher training, clips/s (batch 8)   : {consumed:8.1f}")
    print(f"ratio: one worker decodes {decoded / consumed:.0f}x what the teacher consumes")


if __name__ == "__main__":
    main()
