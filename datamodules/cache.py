"""`fada cache`: add VAE latents and audio features to existing shards, so training decodes nothing.

    fada cache SHARDS --preset sd15 --out cached/ [--device cuda] [--part 3/8]

For every sample of every shard it decodes all frames (PyAV in a decode server, at the preset's frame size) and the
wav, and adds `latents.npy` (n, C, h, w) = the preset's codec on every frame, `audio.npy` (n, L, D)
= its audio features, and json["cache"] = what made them (`clips.cache_spec`: codec, audio
features, frame size), which `data.cached: true` checks against the model it trains. The shards are
written to `--out` under their own names, each complete or not at all (written aside, then renamed);
a shard already there is skipped, so a stopped run continues. A sample that cannot be decoded is
copied unchanged, with a warning naming shard and key (training skips and counts it, as before).
`--part I/N` caches every N-th shard from the I-th, for N machines or GPUs working at once.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.cli import instantiate_class
from tqdm import tqdm

from fada_lightning.presets import load_preset

from .decoding import open_video, read_wav
from .clips import REQUIRED_FIELDS, BadSampleWarning, _describe, cache_spec
from .shards import resolve_shards
from .synthetic import write_tar


class Cacher:
    """The preset's codec and audio features, run over one sample at a time."""

    def __init__(self, preset: str | dict, device: str = "cpu", dtype: str = "float16", chunk: int = 32):
        self.preset = load_preset(preset)
        self.spec = cache_spec(self.preset)
        self.codec = instantiate_class((), self.preset["codec"]).to(device).eval()
        self.audio_features = instantiate_class((), self.preset["audio_features"])
        self.device, self.dtype, self.chunk = torch.device(device), np.dtype(dtype), chunk

    @torch.no_grad()
    def __call__(self, sample: dict) -> dict:
        """A raw sample -> the same sample plus latents.npy, audio.npy and json["cache"]."""
        missing = [k for k in REQUIRED_FIELDS if k not in sample]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        size = self.spec["frame_size"]
        video = open_video(sample["mp4"])
        n = len(video)
        latents = []
        for first in range(0, n, self.chunk):  # (chunk, 3, H, W) in [-1, 1] -> (chunk, C, h, w)
            frames = torch.from_numpy(video.frames(np.arange(first, min(n, first + self.chunk)), size))
            pixels = frames.permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
            latents.append(self.codec.encode(pixels).float().cpu())
        features = self.audio_features(torch.from_numpy(read_wav(sample["wav"])), n)  # (n, L, D)
        meta = json.loads(sample["json"])
        meta["cache"] = self.spec
        return {**sample, "json": json.dumps(meta).encode(),
                "latents.npy": _npy(torch.cat(latents).numpy().astype(self.dtype)),
                "audio.npy": _npy(features.numpy().astype(self.dtype))}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def cache_shard(url: str, out: Path, cacher: Cacher, bar: tqdm) -> int:
    """One shard -> `out` (complete or absent). -> the number of samples copied without a cache."""
    failed = 0

    def samples():
        nonlocal failed
        for raw in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
            try:
                yield cacher(sample)
            except Exception as exn:  # undecodable media: keep the sample as it was, training skips it
                failed += 1
                warnings.warn(f"not cached: sample {raw.get('__key__')!r} in shard {url}: {_describe(exn)}",
                              BadSampleWarning)
                yield sample

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_tar(out, samples(), bar)
    except Exception:
        for partial in out.parent.glob(f".{out.name}.tmp*"):  # write_tar's file aside: never left behind
            partial.unlink()
        raise
    return failed


def shard_name(url: str) -> str:
    """The file name of a shard URL: "pipe:aws s3 cp s3://b/a-0001.tar -" -> "a-0001.tar"."""
    tokens = [t for t in url.split() if t.endswith(".tar")]
    return os.path.basename(tokens[-1] if tokens else url)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="fada cache", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+", help="shards: a directory, a glob, brace notation or URLs")
    p.add_argument("--out", required=True, help="folder for the cached shards (same file names)")
    p.add_argument("--preset", default="micro", help="the model preset whose codec and audio features to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--part", default="0/1", help="I/N: every N-th shard from the I-th")
    args = p.parse_args(argv)
    try:
        index, parts = (int(x) for x in args.part.split("/"))
        urls = resolve_shards(args.shards)[index::parts]
        if not urls:
            raise ValueError(f"no shards in {args.shards} for part {args.part}")
        cacher = Cacher(args.preset, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"fada cache: {err}") from None
    out, written, failed = Path(args.out), [], 0
    with tqdm(desc="caching", unit="clip") as bar:
        for url in urls:
            target = out / shard_name(url)
            if target.exists():
                print(f"[cache] {target} exists, skipped")
                continue
            try:
                failed += cache_shard(url, target, cacher, bar)
            except Exception as err:  # an unreadable tar: say which, go on with the others
                warnings.warn(f"shard {url} not cached, it cannot be read: {_describe(err)}", BadSampleWarning)
                continue
            written.append(target)
    print(f"[cache] {len(written)} shards written to {out} ({bar.n} clips, {failed} not cached: see warnings)")
    return written


if __name__ == "__main__":
    main()
