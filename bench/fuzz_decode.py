"""Which video decoder can no sample crash, and what does it cost? For every backend of
datamodules/decoding.py: clips per second one data worker
decodes from real shards, in process and isolated in a decode server, and the outcome of decoding
N mutated mp4s (fada_lightning/faults.py) in the decode server: decoded, refused with an error,
or crashed / hung (which in process would have ended the training run).

    python bench/fuzz_decode.py [--mutations 1000] [--clips 200] [--root data/synthetic]

torchcodec is not among them: its wheels for torch 2.11 (0.11) load the system's FFmpeg libraries,
which a pip install does not bring, and it adds nothing PyAV lacks here.
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import webdataset as wds

from datamodules.decoding import CLIP_CLASSES, DecodeError, DecoderCrash, open_video
from datamodules.synthetic import ensure_dataset
from fada_lightning.faults import MUTATIONS, mutations

FRAMES = 11  # motion 2 + clip 8 + reference, as a training item reads


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
    print(f"{len(media)} clips of {args.size}x{args.size}, {FRAMES} frames read per clip; "
          f"{len(cases)} mutated mp4s ({', '.join(MUTATIONS)})\n")
    print(f"{'backend':<8} {'clips/s in process':>19} {'clips/s isolated':>17} {'isolation cost':>15}"
          f" {'decoded':>8} {'refused':>8} {'crashed':>8}")
    for backend in backends:
        inside, isolated = rate(media, backend, False, args.size), rate(media, backend, True, args.size)
        outcome = fuzz(cases, backend, args.size)
        total = sum(outcome.values(), collections.Counter())
        print(f"{backend:<8} {inside:>19.1f} {isolated:>17.1f} {inside / isolated:>14.2f}x"
              f" {total['decoded']:>8} {total['refused']:>8} {total['crashed']:>8}")
        crashes = {kind: counts["crashed"] for kind, counts in outcome.items() if counts["crashed"]}
        if crashes:
            print(f"{'':<8} crashes by mutation: {crashes}")

if __name__ == "__main__":
    main()
