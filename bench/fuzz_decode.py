"""Which video decoder can no sample crash, and what does it cost? For every backend of
datamodules/decoding.py: clips per second one data worker
decodes from real shards, in process and isolated in a decode server, and the outcome of decoding
N mutated mp4s (fada_lightning/faults.py) in the decode server: decoded, refused with an error,
or crashed / hung (which in process would have ended the training run).

    python bench/fuzz_decode.py [--mutations 1000] [--clips 200] [--root data/synthetic]

torchcodec is measured too where it is installed (`pip install torchcodec==0.11.*` beside torch
2.11, plus the system's FFmpeg libraries, e.g. Debian's libavcodec59 libavformat59 libavfilter8
libavdevice59 libswscale6), through `TorchCodecClip` below as a "module:Class" backend.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from datamodules.decoding import CLIP_CLASSES, DecodeError, DecoderCrash, open_video
from datamodules.synthetic import ensure_dataset
from fada_lightning.faults import MUTATIONS, mutations

FRAMES = 11  # motion 2 + clip 8 + reference, as a training item reads


class TorchCodecClip:
    """torchcodec's VideoDecoder behind the clip interface of datamodules/decoding.py."""

    def __init__(self, data: bytes):
        import torch
        from torchcodec.decoders import VideoDecoder

        try:
            self.decoder = VideoDecoder(torch.frombuffer(bytearray(data), dtype=torch.uint8), dimension_order="NHWC",
                                        num_ffmpeg_threads=1)
        except (RuntimeError, ValueError) as err:
            raise DecodeError(f"{type(err).__name__}: {err}") from None
        self.n = len(self.decoder)
        if self.n == 0:  # as the bundled clips do
            raise DecodeError("no frames")
        meta = self.decoder.metadata
        self.size = (meta.width, meta.height)

    def __len__(self) -> int:
        return self.n

    def frames(self, indices, size):
        import torch

        try:
            pixels = self.decoder.get_frames_at([int(i) for i in indices]).data  # (k, H, W, 3) uint8
        except (RuntimeError, ValueError, IndexError) as err:
            raise DecodeError(f"{type(err).__name__}: {err}") from None
        if size is not None and pixels.shape[1:3] != (size, size):
            pixels = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2).float(), size=(size, size),
                                                     mode="bilinear", antialias=True).round().clamp(0, 255)
            pixels = pixels.byte().permute(0, 2, 3, 1)
        return pixels.numpy()


def samples(shards: list[str], count: int) -> list[dict]:
    out = []
    for sample in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()):
        out.append(sample)
        if len(out) == count:
            break
    return out


def read_item(data: bytes, backend: str, isolate: bool, rng: np.random.Generator, size: int) -> None:
    """What ClipDecoder reads of one clip: its length, then 10 consecutive frames and a reference."""
    clip = open_video(data, backend, isolate)
    n = len(clip)
    start = int(rng.integers(0, max(1, n - FRAMES + 1)))
    clip.frames([*range(start, min(n, start + FRAMES - 1)), int(rng.integers(0, n))], size)


def rate(clips: list[bytes], backend: str, isolate: bool, size: int) -> float:
    rng = np.random.default_rng(0)
    for data in clips[:4]:  # warm-up: imports, the server's start
        read_item(data, backend, isolate, rng, size)
    began = time.perf_counter()
    for data in clips:
        read_item(data, backend, isolate, rng, size)
    return len(clips) / (time.perf_counter() - began)


def fuzz(cases: list[tuple[str, bytes]], backend: str, size: int) -> dict[str, collections.Counter]:
    outcome = {kind: collections.Counter() for kind in MUTATIONS}
    rng = np.random.default_rng(0)
    for kind, data in cases:
        try:
            read_item(data, backend, True, rng, size)
            outcome[kind]["decoded"] += 1
        except DecoderCrash:
            outcome[kind]["crashed"] += 1
        except DecodeError:
            outcome[kind]["refused"] += 1
    return outcome


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--size", type=int, default=32, help="frame size decoded (the shards' own: no resize)")
    args = parser.parse_args(argv)
    manifest = ensure_dataset(args.root, size=args.size)
    shards = [f"{args.root}/{p}" for p in manifest["strict"]]
    clips = samples(shards, args.clips)
    media = [c["mp4"] for c in clips]
    victims = clips[:10]  # mutations of 10 different clips, with their own wav and json to swap in
    per_victim = -(-args.mutations // len(victims))
    cases = [case for i, clip in enumerate(victims)
             for case in mutations(clip["mp4"], per_victim, seed=i, others=[clip["wav"], clip["json"]])]
    cases = cases[:args.mutations]

    backends = list(CLIP_CLASSES)
    if importlib.util.find_spec("torchcodec") is not None:  # imported by name, here and in the decode server
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        backends.append("bench.fuzz_decode:TorchCodecClip")
    print(f"{len(media)} clips of {args.size}x{args.size}, {FRAMES} frames read per clip; "
          f"{len(cases)} mutated mp4s ({', '.join(MUTATIONS)})\n")
    print(f"{'backend':<10} {'clips/s in process':>19} {'clips/s isolated':>17} {'isolation cost':>15}"
          f" {'decoded':>8} {'refused':>8} {'crashed':>8}")
    for backend in backends:
        inside, isolated = rate(media, backend, False, args.size), rate(media, backend, True, args.size)
        outcome = fuzz(cases, backend, args.size)
        total = sum(outcome.values(), collections.Counter())
        name = backend.rpartition(":")[2].replace("Clip", "").lower()  # bench.fuzz_decode:TorchCodecClip -> torchcodec
        print(f"{name:<10} {inside:>19.1f} {isolated:>17.1f} {inside / isolated:>14.2f}x"
              f" {total['decoded']:>8} {total['refused']:>8} {total['crashed']:>8}")
        crashes = {kind: counts["crashed"] for kind, counts in outcome.items() if counts["crashed"]}
        if crashes:
            print(f"{'':<10} crashes by mutation: {crashes}")


if __name__ == "__main__":
    main()
