"""The training stream (SPEC 5): each (rank, worker) reads its own shards, cycled and shuffled, and yields
exactly its share of an epoch; bad samples are skipped and counted, samples that crashed a decoder are
remembered (`CrashedSamples`), tiers are mixed by weight (`TierMix`), and a resumed run continues each
worker's stream where the checkpoint left it."""
from __future__ import annotations

import itertools
import json
import os
import random
import warnings

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .clips import REQUIRED_FIELDS, BadSampleWarning, ClipDecoder, MissingMembers, SkipSample, _describe
from .decoding import DecoderCrash
from .shards import split_shards


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

    def sample_rng(self) -> np.random.Generator:
        """The draws of the raw sample just pulled (its window's start, say): a function of its place in the
        stream alone, so a resumed run draws for each clip what the killed run would have."""
        return np.random.default_rng([self.data.seed, self.first_epoch, self.data.rank, self.worker, self.pulled])

    def next_items(self, count: int):
        produced = 0
        while produced < count:
            raw = next(self.raw)
            self.pulled += 1
            url, key = raw.get("__url__"), raw.get("__key__")
            try:
                if self.data.crashed is not None and self.data.crashed.has(url, key):
                    raise SkipSample(f"it crashed the decoder in an earlier run ({self.data.crashed.path})")
                item = self.data.decoder(raw, self.sample_rng())
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
    worker keeps its stream position across epochs (persistent workers, or num_workers=0); a clip's
    start is drawn from a generator seeded by (seed, first epoch, rank, worker, its place in the
    stream), so a resumed run draws what the killed one would have. Without persistent
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
        return self._streams[worker].next_items(self.samples_per_worker)


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
