"""How fast is `fada prepare` on this CPU, where does its time go, and what do its filters remove?

    python bench/prepare.py [--size 128] [--seconds 3] [--long-seconds 23] [--workers 1,2] [--repeats 3]
    python bench/prepare.py --inputs DIR [--config prepare/default.yaml]    # your own videos

Speed is hours of input video prepared per hour (input seconds / wall seconds; 60 = an hour of video
in a minute), counted over the inputs that pass the probe (their probed duration).

Stages, in this one process with one OpenCV thread (as a worker runs): the probe, the analysis pass
(decode at `analysis_size`, face detector, background flow, the rest: HSV content scores, gray
frames) and the rest of `process_input` (cuts, face tracks and windows, then per window: decode at
full size, audio, crops and scores, sync, mp4 + wav encode). Wrappers on the functions `pipeline` and
`scores` look up at call time time them for the pass (pipeline.py is not changed): a decode is the
time spent inside `iter_video`'s next(), "rest" is what is left of its stage.

End to end: `run.prepare` with each worker count on a fresh folder; each input in its own spawned
process, so this includes a spawn and its imports per input, writing parts and packing the shards.

Filters, read off the run's `.parts/*.json` records: inputs rejected by reason; windows that reached
strict, lenient only, or neither; and per score the windows that fail its bound in each tier.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from datamodules.prepare import media, pipeline, run
from datamodules.prepare import scores as S
from datamodules.prepare.tiers import SCORES, load_config

# (stage, its parts) in print order; a part's "rest" is its stage's seconds minus the named parts
STAGES = {"probe": (),
          "analysis": ("decode", "face detector", "flow"),
          "windows": ("decode", "audio", "sync", "encode")}


class Clock:
    """Seconds per (stage, part), filled by wrappers around the functions the pipeline calls."""

    def __init__(self):
        self.seconds = Counter()

    def timed(self, key, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return wrapper

    def timed_iter(self, fn):
        """iter_video: time spent producing each frame, the analysis pass's (max_side given) or a window's."""
        def wrapper(*args, **kwargs):
            key = ("analysis" if kwargs.get("max_side") else "windows", "decode")
            frames = fn(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    frame = next(frames)
                except StopIteration:
                    return
                finally:
                    self.seconds[key] += time.perf_counter() - start
                yield frame
        return wrapper

    def timed_detector(self, make):
        return lambda *args, **kwargs: self.timed(("analysis", "face detector"), make(*args, **kwargs))


@contextmanager
def patched(clock: Clock):
    """Put the clock's wrappers on the module attributes pipeline.py looks up at call time; undo after."""
    targets = [(pipeline, "analyse", clock.timed(("analysis", None), pipeline.analyse)),
               (pipeline, "iter_video", clock.timed_iter(pipeline.iter_video)),
               (pipeline, "make_detector", clock.timed_detector(pipeline.make_detector)),
               (S, "flow_stats", clock.timed(("analysis", "flow"), S.flow_stats)),
               (pipeline, "read_audio", clock.timed(("windows", "audio"), pipeline.read_audio)),
               (S, "sync_proxy", clock.timed(("windows", "sync"), S.sync_proxy)),
               (S, "syncnet_sync", clock.timed(("windows", "sync"), S.syncnet_sync)),
               (pipeline, "encode_mp4", clock.timed(("windows", "encode"), pipeline.encode_mp4)),
               (pipeline, "encode_wav", clock.timed(("windows", "encode"), pipeline.encode_wav))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
    for module, name, wrapper in targets:
        setattr(module, name, wrapper)
    try:
        yield clock
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def stage_seconds(found: list[tuple[str, str]], config) -> tuple[Counter, float, Counter]:
    """One in-process pass over the inputs -> (seconds per (stage, part), input seconds probed,
    outcomes: clips / rejected at probe / rejected later, by reason)."""
    clock, probed, outcomes = Clock(), 0.0, Counter()
    with patched(clock):
        for path, relative in found:
            start = time.perf_counter()
            try:
                info = media.probe(path, config.min_seconds)
            except media.Rejected as rejected:
                outcomes[f"rejected at probe: {rejected.reason}"] += 1
                continue
            finally:
                clock.seconds[("probe", None)] += time.perf_counter() - start
            probed += info.duration
            start = time.perf_counter()
            try:
                result = pipeline.process_input(path, relative, config, info)
                outcomes["gave windows" if result.clips else "gave no window"] += 1
            except media.Rejected as rejected:
                outcomes[f"rejected later: {rejected.reason}"] += 1
            except Exception as error:  # as run.work: an unforeseen input is named and the pass goes on
                outcomes[f"error: {type(error).__name__}"] += 1
            clock.seconds[("whole", None)] += time.perf_counter() - start
    seconds = clock.seconds
    seconds[("windows", None)] = seconds[("whole", None)] - seconds[("analysis", None)]
    seconds[("whole", None)] += seconds[("probe", None)]
    return seconds, probed, outcomes


def stage_rows(runs: list[Counter], probed: float) -> list[tuple[str, float, float, float]]:
    """Median over repeats -> rows (name, seconds, share of the whole, hours of input per hour)."""
    def median(key):
        return statistics.median(r[key] for r in runs)

    whole, rows = median(("whole", None)), []
    for stage, parts in STAGES.items():
        total = median((stage, None))
        rows.append((stage, total, total / whole, probed / max(total, 1e-9)))
        if parts:
            named = [(part, median((stage, part))) for part in parts]
            for part, seconds in [*named, ("rest", total - sum(s for _, s in named))]:
                rows.append((f"  {stage}: {part}", seconds, seconds / whole, probed / max(seconds, 1e-9)))
    rows.append(("whole (in one process)", whole, 1.0, probed / whole))
    return rows


def end_to_end(folder: str, out: Path, config, workers: int, repeats: int) -> tuple[float, float, dict, Path]:
    """Median (wall seconds, of which packing the shards) of `run.prepare` with `workers` workers, each
    repeat on an emptied folder."""
    target, walls, packs = out / f"workers-{workers}", [], []
    original = run.pack
    for _ in range(repeats):
        shutil.rmtree(target, ignore_errors=True)
        clock = Clock()
        run.pack = clock.timed("pack", original)  # runs in this process, after the workers
        try:
            start = time.perf_counter()
            manifest = run.prepare([folder], target, config, workers=workers, progress=False)
            walls.append(time.perf_counter() - start)
        finally:
            run.pack = original
        packs.append(clock.seconds["pack"])
    return statistics.median(walls), statistics.median(packs), manifest, target


def import_modules(*names: str) -> None:
    import importlib

    for name in names:
        importlib.import_module(name)


def spawn_seconds(*modules: str, repeats: int = 3) -> float:
    """Median seconds to spawn a process (run.py's start method) that imports `modules` and exits."""
    import multiprocessing

    context, walls = multiprocessing.get_context("spawn"), []
    for _ in range(repeats):
        start = time.perf_counter()
        process = context.Process(target=import_modules, args=modules)
        process.start()
        process.join()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def filter_shares(target: Path, manifest: dict) -> None:
    """Print what the filters removed, from a finished run's records."""
    records = [json.loads(p.read_text()) for p in sorted((target / ".parts").glob("*.json"))]
    inputs = len(records)
    print(f"\n## inputs ({inputs})\n| outcome | inputs | share |\n|---|---:|---:|")
    used = sum(1 for r in records if not r["reject"])
    print(f"| used (gave windows) | {used} | {used / inputs:.0%} |")
    for reason, count in sorted(Counter(r["reject"][0] for r in records if r["reject"]).items()):
        print(f"| rejected: {reason} | {count} | {count / inputs:.0%} |")

    clips = [clip for r in records for clip in r["clips"]]
    windows = len(clips) or 1
    tiers = Counter(clip["tier"] or "dropped" for clip in clips)
    seconds = Counter()
    for clip in clips:
        seconds[clip["tier"] or "dropped"] += clip["frames"] / media.FPS
    print(f"\n## windows found ({len(clips)}, {sum(seconds.values()):.1f} s)\n| tier | windows | share | seconds |"
          "\n|---|---:|---:|---:|")
    for tier, label in (("strict", "strict"), ("lenient", "lenient only"), ("dropped", "dropped (neither)")):
        print(f"| {label} | {tiers[tier]} | {tiers[tier] / windows:.0%} | {seconds[tier]:.1f} |")

    # a record keeps one tier's reasons per clip: strict's for a lenient clip, lenient's for a dropped one
    # (strict passes nothing lenient does not). So "fails lenient" counts dropped clips' reasons, and
    # "fails strict" counts lenient clips' reasons plus dropped clips' lenient reasons (a lower bound: a
    # dropped clip's other strict failures are not recorded)
    fails = {"strict": Counter(), "lenient": Counter()}
    for clip in clips:
        names = {reason.split(" ")[0] if reason.split(" ")[0] in SCORES else reason for reason in clip["reasons"]}
        for name in names:
            fails["strict"][name] += clip["tier"] in ("lenient", None)
            fails["lenient"][name] += clip["tier"] is None
    print("\n## windows failing each bound (fails strict: lenient clips' reasons + dropped clips' lenient ones)"
          "\n| score | fails strict | share | fails lenient | share |\n|---|---:|---:|---:|---:|")
    for name in sorted(fails["strict"], key=lambda n: (-fails["strict"][n], n)):
        s, lenient = fails["strict"][name], fails["lenient"][name]
        print(f"| {name} | {s} | {s / windows:.0%} | {lenient} | {lenient / windows:.0%} |")
    dropped = manifest.get("dropped_clips", {})
    if dropped:
        print("dropped windows by first failed bound (manifest): "
              + ", ".join(f"{name} {count}" for name, count in dropped.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default=None, help="a folder of your own videos (default: the test media)")
    parser.add_argument("--config", default=None, help="filter config (default: prepare/testmedia.yaml for the "
                        "test media, prepare/default.yaml for --inputs)")
    parser.add_argument("--size", type=int, default=128, help="test media frame side")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of most test videos")
    parser.add_argument("--long-seconds", type=float, default=23.0, help="length of the one long test video")
    parser.add_argument("--workers", default="1,2", help="worker counts run end to end, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timing (median reported)")
    parser.add_argument("--out", default="runs/bench_prepare", help="scratch folder (test media, runs)")
    parser.add_argument("--keep", action="store_true", help="keep the test media and the runs' output")
    args = parser.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)  # as run.work does in each worker
    out = Path(args.out)
    workers = [int(n) for n in args.workers.split(",")]
    if args.inputs:
        folder, what = args.inputs, args.inputs
    else:
        folder = str(out / "inputs")
        shutil.rmtree(folder, ignore_errors=True)
        from datamodules.prepare.testmedia import write_raw_inputs

        expected = write_raw_inputs(folder, args.size, args.seconds, args.long_seconds)
        what = (f"{len(expected)} test videos, {args.size} px, {args.seconds:g} s (one {args.long_seconds:g} s)")
    config = load_config(args.config or ("prepare/default.yaml" if args.inputs else "prepare/testmedia.yaml"))
    found = run.find_inputs([folder])
    print(f"# {what}; config {config.source}; analysis_size {config.analysis_size}, detector {config.detector}, "
          f"frame_size {config.frame_size}; {args.repeats} repeat(s), medians")
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")

    runs = []
    for _ in range(args.repeats):  # the first pays one-off costs (imports, codec setup): medians
        seconds, probed, outcomes = stage_seconds(found, config)
        runs.append(seconds)
    print(f"\n## stages, one process, one OpenCV thread: {probed:.1f} s of input video that passes the probe "
          f"({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))})")
    print("| stage | seconds | share | h input / h |\n|---|---:|---:|---:|")
    for name, seconds, share, rate in stage_rows(runs, probed):
        print(f"| {name} | {seconds:.2f} | {share:.0%} | {rate:.1f} |")

    print(f"\n## end to end (`run.prepare`, a spawned process per input, parts, shards): {probed:.1f} s of input")
    print("| workers | wall s | h input / h | per worker | speed-up | worker-s / in-process s |"
          "\n|---:|---:|---:|---:|---:|---:|")
    whole = statistics.median(r[("whole", None)] for r in runs)
    manifests, walls, packs = {}, {}, {}
    for n in workers:
        walls[n], packs[n], manifests[n], target = end_to_end(folder, out, config, n, args.repeats)
        print(f"| {n} | {walls[n]:.2f} | {probed / walls[n]:.1f} | {probed / walls[n] / n:.1f} | "
              f"{walls[workers[0]] / walls[n]:.2f}x | {walls[n] * n / whole:.2f}x |")
    if 1 in workers:  # one worker: the wall time is a sum
        spawn = spawn_seconds("datamodules.prepare.pipeline")
        left = walls[1] - whole - packs[1] - spawn * len(found)
        print(f"1 worker: {walls[1]:.2f} s = in-process whole {whole:.2f} + packing {packs[1]:.2f} + {len(found)} "
              f"spawns x {spawn:.2f} (spawn, import the pipeline, exit) + {left:.2f} left ({left / len(found):.2f} s "
              "an input: a fresh process's first calls, writing its part, other load on the cores)")
    print("same manifest with every worker count: "
          f"{'yes' if len({json.dumps(m, sort_keys=True) for m in manifests.values()}) == 1 else 'NO'}")
    filter_shares(target, manifests[workers[-1]])

    if not args.keep:
        for n in workers:
            shutil.rmtree(out / f"workers-{n}", ignore_errors=True)
        if not args.inputs:
            shutil.rmtree(folder, ignore_errors=True)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()


if __name__ == "__main__":  # spawned workers re-import this file: nothing may run at import
    main()
