"""WebDataset streaming of talking-head clips (SPEC 5).

    shards (tar) --split_shards(rank, worker)--> this worker's shards, shuffled each pass, cycled
      --wds.tarfile_to_samples--> raw samples {__key__, __url__, mp4, wav, json}
      --ClipDecoder (decoding.py: PyAV in a decode server, from bytes)--> items (shapes in `ClipDecoder.__call__`)

Every (rank, worker) streams its own disjoint shards and yields exactly `samples_per_worker`
items an epoch, so every rank sees the same number of batches. Bad data never stops training:
an undecodable, short or incomplete sample, or an unreadable tar, is skipped with a
`BadSampleWarning` naming shard URL and key, and counted in each item's `skipped` field.
A sample that crashes the (isolated) video decoder costs that sample only, and is remembered
(`CrashedSamples`). Nothing is unpickled: json via json.loads, wav via `wave`, video via PyAV.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import os
import random
import warnings
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .audio_features import SAMPLES_PER_FRAME, AudioFeatures, LogMelFeatures, audio_windows
from .decoding import VIDEO_BACKENDS, DecoderCrash, open_video, read_wav

REQUIRED_FIELDS = ("mp4", "wav", "json")
CACHE_FIELDS = ("latents.npy", "audio.npy")  # added by `fada cache` (datamodules/cache.py)
# members above these sizes are skipped before they are parsed: 4 s of 512 px H.264 is ~1 MB, its wav
# 125 kB, its json a few kB (SPEC 5); the limits leave room for 10 s clips of larger frames
MAX_MEMBER_MB = {"json": 4, "wav": 64, "mp4": 512, "latents.npy": 512, "audio.npy": 512}
# the synthetic world's scores (datamodules/synthetic.py); real data names its own in `quality_keys`
QUALITY_KEYS = ("av_offset_frames", "blur_sigma", "noise_std", "motion_amplitude")


class BadSampleWarning(UserWarning):
    """A sample or shard was skipped because it could not be read."""


class ResizedClipWarning(UserWarning):
    """Clips are decoded at another frame size than the shards hold (see its count)."""


class SkipSample(Exception):
    """Raised by the decoder for data that is readable but unusable (too short, missing fields)."""


class MissingMembers(SkipSample):
    """A sample without all of REQUIRED_FIELDS (a shard cut short leaves one)."""


# ---- shard lists ------------------------------------------------------------------------------
def is_remote(url: str) -> bool:
    """True for anything webdataset opens that is not a local path (http://, s3://, pipe:, ...)."""
    return "://" in url or url.startswith("pipe:")


def resolve_shards(spec: str | list[str] | None) -> list[str]:
    """A directory (its *.tar, sorted), a glob, brace notation ("x-{00000..00007}.tar"), a URL,
    or a list of any of these -> a flat list of shard URLs. Whether listed files exist is
    checked by `check_local_shards`; an empty directory or a glob matching nothing fails here."""
    if not spec:
        return []
    if not isinstance(spec, str):
        return [url for item in spec for url in resolve_shards(item)]
    if is_remote(spec) or "{" in spec:
        return wds.shardlists.expand_urls(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise FileNotFoundError(f"no .tar shards in directory {path}")
        return found
    if glob.has_magic(path):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"no shards match {path}")
        return found
    return [path]


def check_local_shards(urls: list[str], name: str) -> None:
    """One clear error, before training starts, for local shards that are missing or unreadable."""
    if not urls:
        raise FileNotFoundError(f"{name}: no shards found (give a directory of .tar files, a glob, "
                                f"brace notation like 'data/strict/strict-{{00000..00007}}.tar', or a list)")
    local = [u[len("file:"):] if u.startswith("file:") else u for u in urls if not is_remote(u)]
    missing = [p for p in local if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{name}: shard {', '.join(missing[:3])}{more} does not exist")
    unreadable = [p for p in local if not os.access(p, os.R_OK)]
    if unreadable:
        raise PermissionError(f"{name}: shard {unreadable[0]} is not readable")


def split_shards(urls: list, rank: int, world_size: int, worker: int, num_workers: int) -> list:
    """This (rank, worker)'s shards: by rank, then by worker. Disjoint and covering over all pairs."""
    needed = world_size * num_workers
    if len(urls) < needed:
        raise ValueError(f"{len(urls)} shards cannot feed {world_size} ranks x {num_workers} data workers: "
                         f"need at least {needed} shards (write smaller shards, or use fewer workers)")
    return list(urls)[rank::world_size][worker::num_workers]


# ---- one sample -> one training item --------------------------------------------------------
@dataclass
class ClipDecoder:
    """Raw webdataset sample -> training item; see `__call__` for the shapes.

    A training clip starts at a random s in [M, n - F] with a random reference frame; with
    rng=None (validation) the clip starts at s = M and the reference is the last frame, so the
    item is a pure function of the sample."""

    audio_features: object  # a datamodules.audio_features class: (wav, T) -> (T, L, D)
    clip_frames: int = 8  # F
    motion_frames: int = 2  # M
    audio_radius: int = 2  # r: windows of 2r + 1 frames
    frame_size: int | None = None  # resize on decode; None keeps the shard's size
    quality_keys: tuple[str, ...] = QUALITY_KEYS  # json["quality"] entries read into "quality" (Q,)
    with_wav: bool = False  # also hand back the clip's own audio samples (evaluation: Sync-D)
    cache: dict | None = None  # read `fada cache`'s latents.npy / audio.npy made by exactly this (cache_spec)
    video_backend: str = "pyav"  # datamodules.decoding.VIDEO_BACKENDS
    isolate: bool = True  # decode video in a subprocess: a native crash costs one sample (decoding.py)
    max_member_mb: dict = field(default_factory=lambda: dict(MAX_MEMBER_MB))  # a larger member is skipped unread
    resized: int = field(default=0, init=False, repr=False)  # clips decoded at another frame size, this process

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        """-> {"frames": (F, 3, H, W) in [-1, 1], "motion": (M, 3, H, W), "ref": (3, H, W),
               "audio": (F, 2r + 1, L, D), "mouth_open": (F,) (NaN if the json has none),
               "quality": (Q,) json["quality"][k] for k in quality_keys (NaN where absent),
               "key": str, "tier": str, "start": int}, and with `with_wav` "wav": (F * 640,) float32 at 16 kHz.
        With `cache`, "latents": (M + F + 1, C, h, w) [motion, clip, reference] in place of the pixels
        (nothing is decoded: the GPUs do no decoding or encoding work)."""
        missing = [k for k in REQUIRED_FIELDS if k not in sample]
        if missing:
            raise MissingMembers(f"missing {', '.join(missing)}")
        for name, limit in self.max_member_mb.items():
            if name in sample and len(sample[name]) > limit * 2**20:
                raise SkipSample(f"its {name} is {len(sample[name]) / 2**20:.1f} MB, over the {limit:g} MB limit "
                                 f"(data.max_member_mb)")
        f, m = self.clip_frames, self.motion_frames
        meta = json.loads(sample["json"])
        if self.cache is not None:
            latents, features = self._cached(sample, meta)
            n = len(latents)
        else:
            video = open_video(sample["mp4"], self.video_backend, self.isolate)
            n = len(video)
            if self.frame_size and video.size not in (None, (self.frame_size, self.frame_size)):
                self.resized += 1
                if self.resized & (self.resized - 1) == 0:  # the 1st, 2nd, 4th, 8th ...: a count, not a flood
                    warnings.warn(f"clip {sample['__key__']!r} in shard {sample.get('__url__')} is "
                                  f"{video.size[0]}x{video.size[1]}: resized to {self.frame_size}x{self.frame_size} "
                                  f"({self.resized} clips so far in this process)", ResizedClipWarning)
        if n < m + f:
            raise SkipSample(f"{n} frames, fewer than motion + clip = {m + f}")
        start = int(rng.integers(m, n - f + 1)) if rng is not None else m
        ref = int(rng.integers(0, n)) if rng is not None else n - 1
        wanted = np.concatenate([np.arange(start - m, start + f), [ref]])  # motion [s - M, s), clip [s, s + F), ref

        if self.cache is not None:
            pixels = None
            wav = read_wav(sample["wav"]) if self.with_wav else None
        else:  # decode each wanted frame once, in order
            pixels = torch.from_numpy(video.frames(wanted, self.frame_size))  # (M + F + 1, H, W, 3) uint8
            pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (M + F + 1, 3, H, W) in [-1, 1]
            wav = read_wav(sample["wav"])  # (samples,) float32 at 16 kHz
            if abs(len(wav) - n * SAMPLES_PER_FRAME) > SAMPLES_PER_FRAME:
                raise SkipSample(f"wav has {len(wav)} samples, {n} frames need {n * SAMPLES_PER_FRAME}")
            features = self.audio_features(torch.from_numpy(wav), n)  # (n, L, D), whole clip as in sampling

        mouth = meta.get("mouth_open")
        mouth_open = (torch.tensor(mouth[start:start + f], dtype=torch.float32) if mouth is not None
                      else torch.full((f,), float("nan")))
        if mouth_open.shape != (f,):
            raise SkipSample(f"json mouth_open has {len(mouth)} entries for {n} frames")
        key = sample["__key__"]
        scores = meta.get("quality") or {}
        try:
            quality = torch.tensor([float(scores.get(k, "nan")) for k in self.quality_keys])
        except (AttributeError, TypeError, ValueError):
            raise SkipSample(f"json quality {scores!r} is not a mapping of numbers") from None
        item = {
            "audio": audio_windows(features, start, f, self.audio_radius),  # (F, 2r + 1, L, D)
            "mouth_open": mouth_open,
            "quality": quality,
            "key": key,
            "tier": str(meta.get("tier", key.split("-")[0])),
            "start": start,
        }
        if pixels is None:
            item["latents"] = latents[torch.from_numpy(wanted)].float()
        else:
            item.update(frames=pixels[m:m + f], motion=pixels[:m], ref=pixels[-1])
        if self.with_wav:  # the clip's samples, zero-padded if the wav ends up to a frame early
            own = torch.from_numpy(wav[start * SAMPLES_PER_FRAME:(start + f) * SAMPLES_PER_FRAME])
            item["wav"] = torch.nn.functional.pad(own, (0, f * SAMPLES_PER_FRAME - len(own)))
        return item

    def _cached(self, sample: dict, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`fada cache`'s members -> latents (n, C, h, w), audio features (n, L, D), checked against `cache`."""
        made_by = meta.get("cache")
        if made_by != self.cache:
            raise SkipSample(f"its cached latents / audio features were made by {made_by}, this model needs "
                             f"{self.cache}: run `fada cache` for this model's preset on these shards")
        missing = [k for k in CACHE_FIELDS if k not in sample]
        if missing:
            raise SkipSample(f"json names a cache, but {', '.join(missing)} is missing")
        latents, features = (torch.from_numpy(np.load(io.BytesIO(sample[k]), allow_pickle=False)) for k in CACHE_FIELDS)
        if len(latents) != len(features):
            raise SkipSample(f"latents.npy has {len(latents)} frames, audio.npy {len(features)}")
        return latents, features.float()


def cache_spec(preset: dict) -> dict:
    """What cached latents and audio features depend on: the codec, the audio features and the frame size."""
    return {"codec": preset["codec"], "audio_features": preset["audio_features"], "frame_size": preset["frame_size"]}


def _describe(exn: Exception, limit: int = 200) -> str:
    """Decoders may put the whole input into their messages; keep warnings short."""
    text = f"{type(exn).__name__}: {exn}"
    return text if len(text) <= limit else text[:limit] + "..."


# ---- the training stream -----------------------------------------------------------------------
class CrashedSamples:
    """Samples that crashed (or hung) an isolated decoder, one JSON line each in `path`
    ({"url", "key", "reason"}), so that later epochs and resumed runs skip them without decoding.
    Workers append whole lines (O_APPEND); the file is read once, where the stream is built."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.known: set[tuple[str, str]] = set()
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    try:
                        entry = json.loads(line)
                        self.known.add((entry["url"], entry["key"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill

    def has(self, url: str, key: str) -> bool:
        return (url, key) in self.known

    def add(self, url: str, key: str, reason: str) -> None:
        self.known.add((url, key))
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        line = json.dumps({"url": url, "key": key, "reason": reason}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def this_worker(dataset) -> int:
    """The DataLoader worker this runs in (0 without workers), checked against the dataset's `num_workers`."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if num_workers != dataset.num_workers:
        raise RuntimeError(f"{type(dataset).__name__} was built for {dataset.num_workers} workers but the DataLoader "
                           f"has {num_workers}; pass the same num_workers to both")
    return worker


class _WorkerStream:
    """State one data worker keeps across epochs: its endless raw-sample stream and skip count.

    The stream is a pure function of (seed, first_epoch, rank, worker), so its position is one
    number: `pulled`, the raw samples taken from it. A resumed run rebuilds the stream from the
    `ClipStream.resume` entry of its worker (first_epoch, pulled, skipped) and discards `pulled`
    raw samples without decoding them, so it goes on with the clips the killed run had not reached."""

    def __init__(self, data: "ClipStream", worker: int, num_workers: int):
        self.data, self.worker = data, worker
        self.shards = split_shards(data.urls, data.rank, data.world_size, worker, num_workers)
        self.global_worker = data.rank * num_workers + worker
        first_epoch, pulled, skipped = data.resume.get(self.global_worker, (data.epoch, 0, 0))
        self.first_epoch = first_epoch
        self.skipped = skipped
        self.good = 0  # items decoded so far (and raw samples fast-forwarded)
        self.pulled = 0  # raw samples taken from the stream, decoded or skipped
        self.url = None  # the shard being read
        self.visit = 0  # shards opened so far; unreadable data is counted once per visit
        self.failed_visit = -1
        self.epochs = 0
        self.fast_forwarding = False
        self.read_in_visit = 0  # whole samples the open shard has given so far
        self.truncated: set[str] = set()  # shards whose loss `settle_visit` counted
        stages = [self.shard_cycle, wds.tarfile_to_samples(handler=self.on_tar_error), self.count_read]
        if data.shuffle_buffer > 1:  # mix samples across this worker's recent shards, seeded per worker
            seed = np.random.SeedSequence([data.seed, first_epoch, data.rank, worker]).generate_state(1)[0]
            stages.append(wds.shuffle(data.shuffle_buffer, initial=data.shuffle_buffer, rng=random.Random(int(seed))))
        self.raw = iter(wds.DataPipeline(*stages))
        self.fast_forward(pulled)

    def fast_forward(self, count: int) -> None:
        """Take `count` raw samples without decoding them (the run that read them counted their skips;
        here they count as usable, so a pass that ends among them is not taken for a pass of bad data)."""
        self.fast_forwarding = True
        try:
            for _ in range(count):
                next(self.raw)
                self.pulled += 1
                self.good += 1
        finally:
            self.fast_forwarding = False

    def shard_cycle(self):
        """{"url": ...} over this worker's shards, endlessly; a new seeded order each pass."""
        for n_pass in itertools.count():
            good_before = self.good
            order = np.random.default_rng([self.data.seed, self.first_epoch, self.data.rank, self.worker, n_pass])
            for i in order.permutation(len(self.shards)):
                self.settle_visit()
                self.url, self.read_in_visit = self.shards[i], 0
                self.visit += 1
                yield {"url": self.url}
            if self.good == good_before:  # a whole pass without one usable clip: stop, do not spin
                raise RuntimeError(f"data worker {self.global_worker}: no usable clip in a full pass over its "
                                   f"shards {self.shards} ({self.skipped} skipped; see the warnings above)")

    def count_read(self, samples):
        """webdataset stage: count the whole samples each visit of a shard gives (see `settle_visit`)."""
        for sample in samples:
            self.read_in_visit += all(k in sample for k in REQUIRED_FIELDS)
            yield sample

    def settle_visit(self) -> None:
        """When a visit of a shard that failed to read ends: the whole samples it should have given
        (`ClipStream.shard_samples`) and did not are lost, and counted one each (a part-read sample it
        left is one of them, not counted again); a failed shard of unknown size counts as one."""
        if self.url is None or self.fast_forwarding or self.failed_visit != self.visit:
            return
        self.truncated.add(self.url)
        expected = self.data.shard_samples.get(self.url)
        lost = max(0, expected - self.read_in_visit) if expected is not None else 1
        self.skipped += lost
        if expected is not None:
            warnings.warn(f"shard {self.url}: {lost} of its {expected} samples could not be read", BadSampleWarning)

    def on_tar_error(self, exn: Exception) -> bool:
        """webdataset handler: warn and go on with the next member or shard (the loss is counted when the
        visit ends). A truncated tar raises at several levels of webdataset; it is reported once per visit."""
        if self.failed_visit == self.visit or self.fast_forwarding:
            return True
        self.failed_visit = self.visit
        warnings.warn(f"skipping unreadable data in shard {self.url}: {_describe(exn)}", BadSampleWarning)
        return True

    def next_items(self, count: int, rng: np.random.Generator):
        produced = 0
        while produced < count:
            raw = next(self.raw)
            self.pulled += 1
            url, key = raw.get("__url__"), raw.get("__key__")
            try:
                if self.data.crashed is not None and self.data.crashed.has(url, key):
                    raise SkipSample(f"it crashed the decoder in an earlier run ({self.data.crashed.path})")
                item = self.data.decoder(raw, rng)
            except Exception as exn:  # corrupt media, bad json, short clip, missing fields, a decoder crash
                self.skipped += not (isinstance(exn, MissingMembers) and url in self.truncated)  # counted as lost
                warnings.warn(f"skipping sample {key!r} in shard {url}: {_describe(exn)}", BadSampleWarning)
                if isinstance(exn, DecoderCrash) and self.data.crashed is not None:
                    self.data.crashed.add(url, key, str(exn))
                continue
            self.good += 1
            produced += 1
            item["skipped"] = self.skipped  # this worker's skips so far
            item["worker"] = self.global_worker  # rank * num_workers + worker
            # where this worker's stream stands after this item (AvatarDataModule.state_dict)
            item.update(stream=self.data.name, stream_epoch=self.first_epoch, pulled=self.pulled)
            yield item


class ClipStream(IterableDataset):
    """The training stream of one rank: `samples_per_worker` items per DataLoader worker per epoch.

    Rank and world size are given, never read from globals; the DataLoader worker comes from
    `get_worker_info()` and `num_workers` must match the DataLoader's (0 counts as 1). Each
    worker keeps its stream position across epochs (persistent workers, or num_workers=0); clip
    starts are drawn from a generator seeded by (seed, epoch, rank, worker). Without persistent
    workers call `set_epoch` every epoch, or every epoch replays the first. shuffle_buffer: samples
    held and drawn from at random (webdataset's shuffle, seeded alike), so a batch mixes shards.
    `resume` ({global worker: (first_epoch, pulled, skipped)}, from a checkpoint) puts each worker's
    stream where a killed run left it (`_WorkerStream`)."""

    def __init__(self, urls: list[str], decoder: ClipDecoder, samples_per_worker: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, seed: int = 0, shuffle_buffer: int = 0,
                 crashed: "CrashedSamples | None" = None, name: str = "train",
                 shard_samples: dict[str, int] | None = None):
        super().__init__()
        self.urls, self.decoder, self.shuffle_buffer = list(urls), decoder, shuffle_buffer
        self.crashed = crashed  # samples that crashed a decoder: skipped unread, and recorded when new
        self.name = name  # the tier it streams, in each item's "stream"
        self.shard_samples = shard_samples or {}  # url -> samples it holds: a truncated shard's loss is counted
        self.resume: dict[int, tuple[int, int, int]] = {}  # global worker -> (first_epoch, pulled, skipped)
        self.resume_in_epoch: dict[int, int] = {}  # global worker -> items it had yielded in the killed epoch
        self.samples_per_worker = samples_per_worker
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.seed = seed
        self.epoch = 0
        split_shards(self.urls, rank, world_size, 0, self.num_workers)  # fail now if too few shards
        self._streams: dict[int, _WorkerStream] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_worker * self.num_workers

    def __getstate__(self):  # worker streams are per process
        return {**self.__dict__, "_streams": {}}

    def __iter__(self):
        worker = this_worker(self)
        done = 0 if worker in self._streams else resumed_in_epoch(self, worker)
        items = itertools.islice(self.iter_worker(worker), self.samples_per_worker - done)
        for index, item in enumerate(items, start=done + 1):
            item["in_epoch"] = index  # this worker's items so far this epoch
            yield item

    def iter_worker(self, worker: int):
        """This process's items as DataLoader worker `worker` for the next epoch."""
        if worker not in self._streams:
            self._streams[worker] = _WorkerStream(self, worker, self.num_workers)
        stream = self._streams[worker]
        epoch = self.epoch + stream.epochs
        stream.epochs += 1
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        return stream.next_items(self.samples_per_worker, rng)


def resumed_in_epoch(dataset, worker: int) -> int:
    """Items `worker` had yielded in the epoch a run was killed in (`resume_in_epoch`, from its
    checkpoint), so the resumed epoch yields only the rest, as Lightning expects (a worker that had
    finished its share yields none); 0 when every worker had finished: that epoch was over."""
    done = dataset.resume_in_epoch
    if not done or all(count >= dataset.samples_per_worker for count in done.values()):
        return 0
    return done.get(dataset.rank * dataset.num_workers + worker, 0)


class TierMix(IterableDataset):
    """Clips from several tiers (SPEC 5: the strict set A, the lenient additions of B), each item's
    tier drawn with probability `weights[tier]` from a generator seeded by (seed, epoch, rank,
    worker); every tier streams its own shards split over ranks and workers (`ClipStream`), and
    every worker yields exactly `samples_per_worker` items an epoch. Items carry the tier of the
    shard set they came from in "tier"."""

    def __init__(self, tiers: dict[str, ClipStream], weights: dict[str, float], samples_per_worker: int):
        super().__init__()
        if set(weights) != set(tiers) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"tier weights {weights} must be >= 0, not all 0, one per tier of {sorted(tiers)}")
        self.tiers, self.samples_per_worker = tiers, samples_per_worker
        total = sum(weights.values())
        self.names = sorted(tiers)
        self.probabilities = np.array([weights[name] / total for name in self.names])
        first = tiers[self.names[0]]
        self.rank, self.num_workers, self.seed, self.epoch = first.rank, first.num_workers, first.seed, 0
        self._passes: dict[int, int] = {}  # epochs this process has drawn per worker (persistent workers)
        self.resume_in_epoch: dict[int, int] = {}  # global worker -> items it had yielded in the killed epoch

    def __getstate__(self):
        return {**self.__dict__, "_passes": {}}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for stream in self.tiers.values():
            stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.samples_per_worker * self.num_workers

    def __iter__(self):
        worker = this_worker(self)
        passes = self._passes.get(worker, 0)
        self._passes[worker] = passes + 1
        done = resumed_in_epoch(self, worker) if passes == 0 else 0
        rng = np.random.default_rng([self.seed, self.epoch + passes, self.rank, worker, len(self.names)])
        draws = rng.choice(len(self.names), size=self.samples_per_worker, p=self.probabilities)
        streams = {name: self.tiers[name].iter_worker(worker) for name in self.names}
        for index, i in enumerate(draws[done:], start=done + 1):
            item = next(streams[self.names[i]])
            item["tier"], item["in_epoch"] = self.names[i], index
            yield item


# ---- validation ----------------------------------------------------------------------------------
class FixedClips(Dataset):
    """The first `count` usable samples of `urls` (in order), each decoded with the fixed clip
    (rng=None), so validation loss is comparable across epochs. Raw bytes are kept in memory."""

    def __init__(self, urls: list[str], decoder: ClipDecoder, count: int):
        self.decoder, self.skipped = decoder, 0
        self.samples: list[dict] = []

        def warn(exn):
            self.skipped += 1
            warnings.warn(f"validation: skipping unreadable shard data: {_describe(exn)}", BadSampleWarning)
            return True

        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=warn))
        for raw in pipeline:
            if len(self.samples) == count:
                break
            try:
                decoder(raw)
            except Exception as exn:
                self.skipped += 1
                warnings.warn(f"validation: skipping sample {raw.get('__key__')!r} in shard {raw.get('__url__')}: "
                              f"{_describe(exn)}", BadSampleWarning)
                continue
            self.samples.append({k: raw[k] for k in ("__key__", "__url__", *REQUIRED_FIELDS)})
        if not self.samples:
            raise RuntimeError(f"no usable validation clip in {urls}")
        if len(self.samples) < count:
            warnings.warn(f"validation: only {len(self.samples)} of {count} clips available in {urls}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        item = self.decoder(self.samples[index])
        item["skipped"], item["worker"] = self.skipped, -1  # -1: not a streaming worker
        return item


# ---- the DataModule ------------------------------------------------------------------------------
class AvatarDataModule(L.LightningDataModule):
    """Streams training clips from WebDataset shards; validates on a small fixed set.

    Shards: a directory, a glob, brace notation, any URL webdataset opens, or a list. With
    `synthetic` (keyword arguments of `datamodules.synthetic.ensure_dataset`, e.g. {"root":
    "data/synthetic", "strict_clips": 512}) the synthetic world is generated on first use and
    its strict shards train when `train_shards` is empty. Tiers: `train_shards` as {tier: shards}
    (or, with `synthetic`, the manifest's tiers) mixed by `tier_weights` ({"strict": 2, "lenient": 1}:
    each item strict with probability 2/3); with `tier_weights` set each batch's "tier" names the shard
    set every clip came from, and only the weighted tiers stream. An epoch is `epoch_samples` items per
    rank, rounded down to whole batches per worker (at least one), identical on every rank.
    Each batch is a dict: frames (B, F, 3, H, W), motion (B, M, 3, H, W), ref (B, 3, H, W),
    audio (B, F, 2r + 1, L, D), mouth_open (B, F), quality (B, Q) (the json's scores named by
    `quality_keys`, default the synthetic world's; NaN where absent), key / tier (lists of B str), start (B,),
    skipped (B,) (that worker's skipped samples so far), worker (B,) (global id; -1 in validation),
    stream (B str), stream_epoch (B,), pulled (B,), in_epoch (B,) (where that worker's stream and epoch
    stand: a checkpoint keeps it, so a resumed run continues each stream instead of replaying its epoch).
    At scale: `cached` trains on the VAE latents and audio features `fada cache` added to the shards
    (batches then hold latents (B, M + F + 1, C, h, w) in place of frames / motion / ref; validation
    still decodes, for its sample videos); `shuffle_buffer` mixes clips of a worker's recent shards;
    `prefetch_factor` batches each worker prepares ahead (DataLoader's, default 2).
    Decoding (datamodules/decoding.py): `video_backend` "pyav", "decord" or "module:Class"; `isolate_decoding` runs it
    in a subprocess per worker, so a sample that crashes or hangs the decoder is skipped, named and
    appended to `crashed_samples` (default: crashed_samples.jsonl in the run's log folder), which later
    epochs and resumed runs skip without decoding. decord segfaults on some corrupt mp4s: keep it isolated.
    `max_member_mb` raises or lowers the size limits of `MAX_MEMBER_MB` ({"json": 4, ...}): a larger
    member is skipped before it is parsed. `shard_samples` ({shard: samples}, or a JSON file of it; the
    synthetic world's come from its manifest) lets a truncated shard count every sample it lost."""

    def __init__(self, train_shards: str | list[str] | dict[str, str | list[str]] | None = None,
                 val_shards: str | list[str] | None = None, audio_features: AudioFeatures | None = None,
                 clip_frames: int | None = None, motion_frames: int | None = None, audio_radius: int = 2,
                 frame_size: int | None = None, batch_size: int = 8, num_workers: int = 2, epoch_samples: int = 1024,
                 val_samples: int = 16, seed: int = 0, synthetic: dict | None = None,
                 tier_weights: dict[str, float] | None = None, quality_keys: list[str] | None = None,
                 cached: bool = False, shuffle_buffer: int = 0, prefetch_factor: int | None = None,
                 video_backend: str = "pyav", isolate_decoding: bool = True, crashed_samples: str | None = None,
                 max_member_mb: dict[str, float] | None = None, shard_samples: str | dict[str, int] | None = None):
        super().__init__()
        if video_backend not in VIDEO_BACKENDS and ":" not in video_backend:
            raise ValueError(f"data.video_backend {video_backend!r} is not one of {VIDEO_BACKENDS} "
                             "nor a 'module:Class' of your own")
        # clip shape and audio features default to the model's (see `_make_decoder`), so they are
        # not hparams of their own: Lightning would report a None here as a conflict with the model
        self.save_hyperparameters(ignore=["audio_features", "clip_frames", "motion_frames"])
        self.audio_features, self.clip_frames, self.motion_frames = audio_features, clip_frames, motion_frames
        self.decoder: ClipDecoder | None = None
        self.train_set: ClipStream | TierMix | None = None
        self._positions: dict[str, tuple[int, int, int]] = {}  # "tier/worker" -> (first_epoch, pulled, skipped)
        self._in_epoch: dict[int, int] = {}  # global worker -> items it yielded so far this epoch
        self.val_set: FixedClips | None = None

    def _make_decoder(self, cached: bool = False) -> ClipDecoder:
        """Audio features and clip shape the model was built for, unless given here: the model owns
        them (its audio projection and temporal layers depend on them). `cached`: read the latents and
        audio features of the model's preset from the shards instead."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        model_hp = getattr(model, "hparams", {})

        def pick(name, default):
            mine = getattr(self, name)
            return mine if mine is not None else model_hp.get(name, default)

        features = self.audio_features or getattr(model, "audio_features", None) or LogMelFeatures()
        frame_size = self.hparams.frame_size or getattr(model, "preset", {}).get("frame_size")
        quality = QUALITY_KEYS if self.hparams.quality_keys is None else tuple(self.hparams.quality_keys)
        cache = None
        if cached:
            if not isinstance(getattr(model, "preset", None), dict):
                raise ValueError("data.cached reads latents made for the model's preset: it needs a model with a preset")
            cache = cache_spec(model.preset)
        return ClipDecoder(features, pick("clip_frames", 8), pick("motion_frames", 2), self.hparams.audio_radius,
                           frame_size, quality, cache=cache, video_backend=self.hparams.video_backend,
                           isolate=self.hparams.isolate_decoding,
                           max_member_mb={**MAX_MEMBER_MB, **(self.hparams.max_member_mb or {})})

    def _shard_samples(self) -> dict[str, int]:
        """{shard url: samples it holds}, from the synthetic manifest and `shard_samples`."""
        sizes, given = {}, self.hparams.shard_samples
        manifest = os.path.join(self.hparams.synthetic["root"], "manifest.json") if self.hparams.synthetic else None
        if manifest and os.path.isfile(manifest):
            from .synthetic import shard_sample_counts

            with open(manifest) as f:
                counts = shard_sample_counts(json.load(f))
            sizes.update({os.path.join(self.hparams.synthetic["root"], p): n for p, n in counts.items()})
        if isinstance(given, str):
            with open(given) as f:
                given = json.load(f)
        sizes.update(given or {})
        return sizes

    def _crashed_samples(self) -> CrashedSamples | None:
        """The record of samples that crashed a decoder: `crashed_samples`, else the run's log folder."""
        path = self.hparams.crashed_samples
        if path is None and self.trainer is not None and self.trainer.log_dir:
            path = os.path.join(self.trainer.log_dir, "crashed_samples.jsonl")
        return CrashedSamples(path) if path else None

    def _synthetic_val(self) -> dict:
        """Held-out synthetic clips: another seed, so identities and audio the model never trained on."""
        synthetic = self.hparams.synthetic
        return dict(root=os.path.join(synthetic["root"], "val"), seed=synthetic.get("seed", 0) + 1000,
                    strict_clips=self.hparams.val_samples, lenient_clips=0,
                    clips_per_shard=self.hparams.val_samples, progress=False,
                    **{k: synthetic[k] for k in ("size", "frames") if k in synthetic})

    def prepare_data(self):
        if self.hparams.synthetic:
            from .synthetic import ensure_dataset

            ensure_dataset(**self.hparams.synthetic)
            if not self.hparams.val_shards:
                ensure_dataset(**self._synthetic_val())

    def _train_urls(self) -> dict[str, list[str]]:
        """{tier: shard URLs}; one tier ("train") for a plain list of shards."""
        spec, tiers = self.hparams.train_shards, self.hparams.tier_weights
        if isinstance(spec, dict):
            urls = {tier: resolve_shards(shards) for tier, shards in spec.items()}
        elif spec:
            urls = {"train": resolve_shards(spec)}
        elif self.hparams.synthetic:
            root = self.hparams.synthetic["root"]
            manifest = os.path.join(root, "manifest.json")
            if not os.path.isfile(manifest):
                raise FileNotFoundError(f"synthetic dataset {manifest} missing: prepare_data did not run here")
            with open(manifest) as f:
                listed = json.load(f)
            names = [t for t in ("strict", "lenient") if t in listed] if tiers else ["strict"]
            urls = {tier: [os.path.join(root, p) for p in listed[tier]] for tier in names}
        else:
            urls = {"train": []}
        if tiers is not None:
            unknown = sorted(set(tiers) - set(urls))
            if unknown:
                raise ValueError(f"tier_weights name tiers {unknown} that train_shards does not have ({sorted(urls)})")
            urls = {tier: urls[tier] for tier in tiers}
        elif len(urls) > 1:
            raise ValueError(f"train_shards has tiers {sorted(urls)}: give tier_weights to mix them")
        for tier, tier_urls in urls.items():
            check_local_shards(tier_urls, f"train_shards[{tier}]" if tier != "train" else "train_shards")
        return urls

    def setup(self, stage: str | None = None):
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.decoder = self.decoder or self._make_decoder()
        if stage in (None, "fit") and self.train_set is None:
            hp = self.hparams
            workers = max(1, hp.num_workers)
            per_worker = max(1, hp.epoch_samples // (workers * hp.batch_size)) * hp.batch_size
            if per_worker * workers != hp.epoch_samples:
                warnings.warn(f"epoch_samples {hp.epoch_samples} -> {per_worker * workers} per rank "
                              f"(whole batches of {hp.batch_size} on each of {workers} workers)")
            decoder = self._make_decoder(cached=True) if hp.cached else self.decoder
            crashed = self._crashed_samples()
            sizes = self._shard_samples()
            streams = {tier: ClipStream(urls, decoder, per_worker, rank, world_size, hp.num_workers, hp.seed,
                                        hp.shuffle_buffer, crashed, name=tier, shard_samples=sizes)
                       for tier, urls in self._train_urls().items()}
            if hp.tier_weights is None:
                (self.train_set,) = streams.values()
            else:
                self.train_set = TierMix(streams, hp.tier_weights, per_worker)
            self._resume_streams()
        val_shards = self.hparams.val_shards
        if not val_shards and self.hparams.synthetic:
            val_shards = os.path.join(self._synthetic_val()["root"], "strict")
        if stage in (None, "fit", "validate", "test", "predict") and self.val_set is None and val_shards:
            urls = resolve_shards(val_shards)
            check_local_shards(urls, "val_shards")
            self.val_set = FixedClips(urls, self.decoder, self.hparams.val_samples)

    # ---- resuming: where each worker's stream stands, in the checkpoint ----------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Note where each stream of this rank stands after the batch about to be trained on (the
        DataLoader's read-ahead is not counted, so a resumed run neither skips nor replays a clip)."""
        if self.trainer is not None and self.trainer.training and "pulled" in batch:
            for stream, worker, epoch, pulled, skipped, in_epoch in zip(
                    batch["stream"], batch["worker"].tolist(), batch["stream_epoch"].tolist(),
                    batch["pulled"].tolist(), batch["skipped"].tolist(), batch["in_epoch"].tolist()):
                key = f"{stream}/{worker}"
                if pulled > self._positions.get(key, (0, -1, 0))[1]:
                    self._positions[key] = (epoch, pulled, skipped)
                self._in_epoch[worker] = in_epoch  # a batch is one worker's consecutive items
        return batch

    def state_dict(self) -> dict:
        """{"streams": {"tier/global worker": [first_epoch, pulled, skipped]}, "in_epoch": {global
        worker: items yielded this epoch}}, over all ranks (every rank takes part in a save)."""
        state = {"streams": {k: list(v) for k, v in self._positions.items()}, "in_epoch": dict(self._in_epoch)}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, state)
            state = {part: {k: v for rank_state in gathered for k, v in rank_state[part].items()} for part in state}
        return state

    def load_state_dict(self, state: dict) -> None:
        self._positions = {k: tuple(v) for k, v in state.get("streams", {}).items()}
        self._in_epoch = {int(k): v for k, v in state.get("in_epoch", {}).items()}
        self._resume_streams()
        if self._positions:  # Lightning cannot see that this stream resumes mid-epoch; it does
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def _resume_streams(self) -> None:
        streams = (list(self.train_set.tiers.values()) if isinstance(self.train_set, TierMix)
                   else [self.train_set] if self.train_set is not None else [])
        for stream in streams:
            stream.resume = {int(key.rsplit("/", 1)[1]): position for key, position in self._positions.items()
                             if key.rsplit("/", 1)[0] == stream.name}
        if self.train_set is not None:
            self.train_set.resume_in_epoch = dict(self._in_epoch)

    def _loader(self, dataset, **kw) -> DataLoader:
        workers = self.hparams.num_workers
        prefetch = {"prefetch_factor": self.hparams.prefetch_factor} if workers > 0 else {}
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), **prefetch, **kw)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # a resumed run continues with fresh clip draws
            self.train_set.set_epoch(self.trainer.current_epoch)
        return self._loader(self.train_set)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

    test_dataloader = predict_dataloader = val_dataloader  # the fixed held-out clips
