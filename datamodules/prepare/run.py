"""`fada prepare INPUT... --out DIR`: every input in its own spawned worker, then shards and a manifest.

    DIR/.parts/<input id>.tar    one finished input's samples (written first, atomically)
    DIR/.parts/<input id>.json   its record: clips with tiers and reasons, or why it was rejected;
                                 present = finished, so a rerun skips it (same file and config)
    DIR/strict/strict-%05d.tar   set A's clips, inputs in path order, `clips_per_shard` each (fewer when
                                 that leaves under `min_shards` shards: every data worker needs one)
    DIR/lenient/lenient-%05d.tar B's additions (B = A + these), as the synthetic world's tiers
    DIR/manifest.json            written last: shards, clips and hours per tier, rejects with their files

A worker that hangs past its time (probe_timeout to probe, then probe_timeout + timeout_per_second per
second of video) is killed and its input rejected as "timeout"; one that crashes (a decoder's segfault)
as "undecodable".
Shards are rebuilt from the parts on every run, so a run killed anywhere leaves nothing to trust but
finished parts, and the same inputs and config give the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import tarfile
import time
import traceback
import warnings
from collections import Counter
from multiprocessing.connection import wait
from pathlib import Path

from tqdm import tqdm

from fada_lightning.presets import ConfigError
from fada_lightning.video_io import write_atomic

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
TIERS = ("strict", "lenient")
FORMAT = "fada-prepare/1"


def find_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """Files and folders (searched recursively for VIDEO_SUFFIXES) -> sorted [(path, name relative to its
    argument)]. A name given twice is kept once."""
    found = {}
    for given in inputs:
        root = Path(given).expanduser()
        if root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES):
                found[str(path.resolve())] = path.relative_to(root).as_posix()
        elif root.is_file():
            found[str(root.resolve())] = root.name
        else:
            raise FileNotFoundError(f"input {given} is neither a file nor a folder")
    named = {}
    for path, relative in found.items():  # a clip's key comes from this name: two files may not share it
        if relative in named:
            raise ValueError(f"{named[relative]} and {path} are both {relative!r} under the inputs given: "
                             "give their common folder instead, or rename one")
        named[relative] = path
    return sorted(found.items(), key=lambda item: (item[1], item[0]))


PACKING = ("clips_per_shard", "min_shards")  # settings of the shards only: changing them redoes no input


def config_hash(config) -> str:
    """What a finished input's part depends on: every setting but PACKING's."""
    settings = {k: v for k, v in config.to_dict().items() if k not in PACKING}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_stamp(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


# ---- one input, in a worker ---------------------------------------------------------------------
def work(path: str, relative: str, config, parts: str, pipe) -> None:
    """Worker body: probe (tell the parent how long the video is), process, write the part; the record
    is written last. A rejected input gets a record too (so it is not retried)."""
    import cv2

    cv2.setNumThreads(1)
    from .media import Rejected, probe
    from .pipeline import input_id, process_input

    record = {"source": relative, "stamp": file_stamp(path), "config": config_hash(config), "clips": [],
              "samples": 0, "reject": None}
    part = Path(parts) / input_id(relative)
    try:
        info = probe(path, config.min_seconds)
        pipe.send(("probed", info.duration))
        result = process_input(path, relative, config, info)
        write_part(part.with_suffix(".tar"), result.samples)
        record.update(clips=result.clips, samples=len(result.samples))
    except Rejected as rejected:
        record["reject"] = [rejected.reason, rejected.detail]
    except Exception as error:  # a bug or an input we did not foresee: named, the run goes on, a rerun retries
        record["reject"] = ["error", f"{type(error).__name__}: {error}"]
        record["traceback"] = traceback.format_exc(limit=6)
    write_atomic(part.with_suffix(".json"), json.dumps(record, sort_keys=True).encode())
    pipe.send(("done", None))


def write_part(path: Path, samples: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as stream:
        write_tar(stream, samples)
    os.replace(tmp, path)


def write_tar(stream, samples) -> None:
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for sample in samples:
            add_sample(tar, sample)


def add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """{"__key__", ext: bytes} -> tar members <key>.<ext>, as webdataset's TarWriter writes them (extensions
    sorted, mode 0444, mtime 0: bytes depend on content only) without importing webdataset, and torch with
    it, in every worker."""
    for ext in sorted(k for k in sample if not k.startswith("__")):
        member = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        member.size, member.mode, member.mtime = len(sample[ext]), 0o444, 0
        member.uname = member.gname = "bigdata"
        tar.addfile(member, io.BytesIO(sample[ext]))


def read_record(parts: Path, relative: str, path: str, config) -> dict | None:
    """A finished input's record, or None when it must be (re)done: missing, another config or file."""
    from .pipeline import input_id

    record_path = parts / f"{input_id(relative)}.json"
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("config") != config_hash(config) or record.get("stamp") != file_stamp(path):
        return None
    if record["reject"] and record["reject"][0] == "error":  # not the input's fault, perhaps: try again
        return None
    if record["samples"] and not (parts / f"{input_id(relative)}.tar").is_file():
        return None
    return record


def reject_record(path: str, relative: str, config, reason: str, detail: str) -> dict:
    return {"source": relative, "stamp": file_stamp(path), "config": config_hash(config), "clips": [],
            "samples": 0, "reject": [reason, detail]}


def run_inputs(todo: list[tuple[str, str]], config, parts: Path, workers: int, on_record) -> None:
    """Process `todo` with up to `workers` spawned workers at a time, each input in its own process
    (a crash or hang costs that input only); `on_record(record)` as each finishes."""
    from .pipeline import input_id

    context = multiprocessing.get_context("spawn")
    waiting, running = list(todo), {}
    while waiting or running:
        while waiting and len(running) < workers:
            path, relative = waiting.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=work, args=(path, relative, config, str(parts), send), daemon=True)
            process.start()
            send.close()
            running[process.sentinel] = [process, receive, path, relative, time.monotonic() + config.probe_timeout]
        wait([*running, *(job[1] for job in running.values())], timeout=1.0)
        for sentinel, job in list(running.items()):
            process, receive, path, relative, _ = job
            while receive.poll():
                try:
                    kind, value = receive.recv()
                except EOFError:
                    break
                if kind == "probed":  # now it has a length: its time is a fixed part and a part per second
                    job[4] = time.monotonic() + config.probe_timeout + config.timeout_per_second * value
            if process.exitcode is None and time.monotonic() < job[4]:
                continue
            record_path = parts / f"{input_id(relative)}.json"
            if process.exitcode is None:  # over its time: kill it and say so
                process.kill()
                process.join()
                record = reject_record(path, relative, config, "timeout", "the worker ran out of time "
                                       f"(probe_timeout {config.probe_timeout:g} s, then that plus "
                                       f"timeout_per_second {config.timeout_per_second:g} s per second of video)")
                write_atomic(record_path, json.dumps(record, sort_keys=True).encode())
            else:
                process.join()
                record = read_record(parts, relative, path, config)
                if record is None:  # died before writing its record: a crash inside a native library
                    record = reject_record(path, relative, config, "undecodable",
                                           f"the worker died (exit code {process.exitcode}) while reading it")
                    write_atomic(record_path, json.dumps(record, sort_keys=True).encode())
            receive.close()
            del running[sentinel]
            on_record(record)


# ---- shards and manifest from the finished parts ------------------------------------------------
class ShardWriter:
    """Samples in order -> DIR/<tier>/<tier>-%05d.tar, `per_shard` each, each shard renamed into place whole."""

    def __init__(self, out: Path, tier: str, per_shard: int):
        self.out, self.tier, self.per_shard = out, tier, per_shard
        self.shards, self.count, self._tar, self._stream = [], 0, None, None

    def write(self, sample: dict) -> None:
        if self.count % self.per_shard == 0:
            self._close()
            self.shards.append(f"{self.tier}/{self.tier}-{len(self.shards):05d}.tar")
            (self.out / self.tier).mkdir(parents=True, exist_ok=True)
            self._stream = open(self._tmp(), "wb")
            self._tar = tarfile.open(fileobj=self._stream, mode="w|")
        add_sample(self._tar, sample)
        self.count += 1

    def _tmp(self) -> Path:
        return self.out / f"{self.shards[-1]}.tmp{os.getpid()}"

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
            os.replace(self._tmp(), self.out / self.shards[-1])
            self._tar = None

    def finish(self) -> list[str]:
        """Close the last shard and delete this tier's shards an earlier, larger run left behind."""
        self._close()
        keep = set(self.shards)
        for old in (self.out / self.tier).glob(f"{self.tier}-*.tar") if (self.out / self.tier).is_dir() else []:
            if f"{self.tier}/{old.name}" not in keep:
                old.unlink()
        return self.shards


def shard_size(clips: int, most: int, min_shards: int) -> int:
    """Clips per shard: `most`, or fewer so that `clips` fill at least `min_shards` shards (when they can)."""
    return max(1, min(most, math.ceil(clips / min_shards)))


def pack(out: Path, parts: Path, records: list[dict], config) -> dict:
    """Finished parts (records in input order) -> shards per tier and the manifest (written last)."""
    import webdataset

    from .pipeline import input_id

    (out / "manifest.json").unlink(missing_ok=True)  # the folder is incomplete until the manifest is back
    counts = Counter(clip["tier"] for r in records if not r["reject"] for clip in r["clips"] if clip["tier"])
    per_shard = {tier: shard_size(counts[tier], config.clips_per_shard, config.min_shards) for tier in TIERS}
    writers = {tier: ShardWriter(out, tier, per_shard[tier]) for tier in TIERS}
    seconds, clips, dropped, rejects = Counter(), Counter(), Counter(), {}
    for record in records:
        if record["reject"]:
            reason, detail = record["reject"]
            rejects.setdefault(reason, []).append({"source": record["source"], "detail": detail})
            continue
        tiers = {clip["key"]: clip for clip in record["clips"]}
        for clip in record["clips"]:
            if clip["tier"] is None:
                dropped[clip["reasons"][0].split(" ")[0] if clip["reasons"] else "unknown"] += 1
        if not record["samples"]:
            continue
        dataset = webdataset.WebDataset(str(parts / f"{input_id(record['source'])}.tar"), shardshuffle=False,
                                        empty_check=False)
        for sample in dataset:
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            clip = tiers[sample["__key__"]]
            writers[clip["tier"]].write(sample)
            seconds[clip["tier"]] += clip["frames"] / 25
            clips[clip["tier"]] += 1
    shards = {tier: writer.finish() for tier, writer in writers.items()}
    used = sum(1 for r in records if not r["reject"])
    manifest = {
        "format": FORMAT, **shards, "clips_per_shard": per_shard,  # per tier: each shard full but its last
        "samples": {tier: writers[tier].count for tier in TIERS},  # clips in each tier's shards
        # set A = strict; set B = strict + lenient (B contains A; its shards hold only B's additions)
        "sets": {"A": {"clips": clips["strict"], "hours": round(seconds["strict"] / 3600, 4)},
                 "B": {"clips": clips["strict"] + clips["lenient"],
                       "hours": round((seconds["strict"] + seconds["lenient"]) / 3600, 4)}},
        "inputs": {"total": len(records), "used": used, "rejected": len(records) - used},
        "rejects": {reason: sorted(items, key=lambda r: r["source"]) for reason, items in sorted(rejects.items())},
        "dropped_clips": dict(sorted(dropped.items())),
        "crop": {"detector": config.detector, "detector_args": config.detector_args, "margin": config.margin,
                 "frame_size": config.frame_size, "analysis_size": config.analysis_size},
        "config": config.to_dict(),
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def prepare(inputs: list[str], out: str | Path, config, workers: int = 1, progress: bool = True) -> dict:
    """The whole run: skip finished inputs, process the rest, pack. -> the manifest."""
    out = Path(out)
    if config.syncnet is None and not config.proxy_sync_in_strict and config.strict:
        warnings.warn(f"{config.source}: no SyncNet weights (syncnet: null), so the weightless proxy scores sync, "
                      "and strict takes only SyncNet's (SPEC 5b): set A will be empty. Give syncnet: a local "
                      "syncnet_v2.model, or set proxy_sync_in_strict: true to let the proxy decide")
    parts = out / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    found = find_inputs(inputs)
    if not found:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {', '.join(inputs)}")
    records = {relative: read_record(parts, relative, path, config) for path, relative in found}
    todo = [(path, relative) for path, relative in found if records[relative] is None]
    tally = Counter()

    def count(record):
        for clip in record["clips"]:
            if clip["tier"]:
                tally[clip["tier"]] += 1
                tally["seconds"] += clip["frames"] / 25
        bar.update()
        hours = tally["seconds"] / 3600
        bar.set_postfix_str(f"strict {tally['strict']}, lenient {tally['lenient']} clips, "
                            + (f"{hours:.2f} h" if hours >= 1 else f"{60 * hours:.1f} min"))

    with tqdm(total=len(found), unit="video", desc="prepare", disable=not progress) as bar:
        for record in records.values():
            if record is not None:
                count(record)
        done = {}

        def finished(record):
            done[record["source"]] = record
            count(record)

        run_inputs(todo, config, parts, max(1, workers), finished)
    records.update(done)
    return pack(out, parts, [records[relative] for _, relative in found], config)


def main(argv: list[str] | None = None) -> None:
    from .tiers import load_config

    parser = argparse.ArgumentParser(prog="fada prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="video files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder: shards per tier and manifest.json")
    parser.add_argument("--config", default=None, help="filter config, a bundled name or a path "
                        "(default prepare/default.yaml; prepare/synthetic.yaml for pre-cropped input)")
    parser.add_argument("--workers", type=int, default=1, help="inputs processed at once, one process each")
    parser.add_argument("--frame-size", type=int, default=None, help="crop side written (overrides the config)")
    parser.add_argument("--detector", default=None, help="haar | none | yunet | module:Class (overrides the config)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, frame_size=args.frame_size, detector=args.detector)
        manifest = prepare(args.inputs, args.out, config, args.workers)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        sys.exit(f"fada prepare: {error}")
    sets, inputs = manifest["sets"], manifest["inputs"]
    print(f"{args.out}: strict (A) {sets['A']['clips']} clips, {sets['A']['hours']:.3f} h; lenient (B, contains A) "
          f"{sets['B']['clips']} clips, {sets['B']['hours']:.3f} h; {inputs['used']} of {inputs['total']} inputs used")
    for reason, items in manifest["rejects"].items():
        print(f"  rejected ({reason}): {len(items)}: {', '.join(i['source'] for i in items[:3])}"
              f"{' ...' if len(items) > 3 else ''}")
    print(f"train on it: data.init_args.train_shards: {Path(args.out) / 'manifest.json'}")


if __name__ == "__main__":
    main()
