"""`fada curve`: a run's held-out curve, every kept checkpoint evaluated (resumable), then plotted.

    fada curve runs/teacher/tb/run                      # each step*.ckpt: IQA, Sync-D, FVD ... against steps
    fada curve runs/teacher/tb/run --every 500 --clips 50 --frames 16

Each checkpoint is scored by `fada evaluate` (the synthetic world's test split by default; other
`fada evaluate` options follow the run folder) into <run>/eval/curve/step<N>.json; a checkpoint
already scored with the same options is skipped, so a curve grows as training goes on. Then
curve.csv and curve.png: IQA, Sync-D, FVD and FID against the step, the real clips' IQA and Sync-D
as dashed lines, and the run's held-out loss (`val/loss` in its TensorBoard) beside them.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path

from . import evaluate
from .video_io import write_atomic

PLOTTED = ("IQA", "Sync-D", "FVD", "FID")
STEP = re.compile(r"step(\d+)\.ckpt$")


def kept_checkpoints(run: Path, every: int = 0) -> list[tuple[int, Path]]:
    """(step, path) of the run's step<N>.ckpt files (FinalCheckpoint's naming), those at multiples of
    `every` when it is given, by step."""
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    found = sorted((int(m.group(1)), p) for p in folder.glob("step*.ckpt") if (m := STEP.search(p.name)))
    if not found:
        raise FileNotFoundError(f"no step<N>.ckpt checkpoints in {folder} (a run of `fada fit` with the bundled "
                                f"configs keeps one every `every_n_train_steps`)")
    return [(step, path) for step, path in found if not every or step % every == 0]


def event_files(run: Path, tag: str) -> list:
    """The run's TensorBoard event files (one per start or resume) that hold the scalar `tag`, in file
    order, each loaded (an EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = []
    for events in sorted(run.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            found.append(accumulator)
    return found


def held_out_loss(run: Path, tag: str = "val/loss") -> list[tuple[int, float]]:
    """(step, value) of a scalar in the run's TensorBoard event files (a resumed step: its last value); []
    when it has none."""
    return sorted({e.step: e.value for file in event_files(run, tag) for e in file.Scalars(tag)}.items())


def training_seconds(run: Path, tag: str = "epoch") -> float:
    """The run's training wall time (validation included): from each event file's opening to its last
    `epoch` scalar (which Lightning logs with every training and validation log), summed over the run's
    starts and resumes; a killed run counts up to its last log."""
    return sum(max(e.wall_time for e in file.Scalars(tag)) - file.FirstEventTimestamp()
               for file in event_files(run, tag))


def evaluate_checkpoints(run: Path, checkpoints: list[tuple[int, Path]], eval_args: list[str],
                         progress: bool = True) -> list[dict]:
    """Each checkpoint's `fada evaluate` result, computed once per set of options (kept beside the JSON)."""
    out, results = run / "eval" / "curve", []
    for step, ckpt in checkpoints:
        path = out / f"step{step:07d}.json"
        if path.exists() and json.loads(path.read_text()).get("curve_args") == eval_args:
            results.append(json.loads(path.read_text()))
            continue
        result = evaluate.run(["--ckpt", str(ckpt), "--out", str(path), "--videos", "0", *eval_args], progress=progress)
        result["curve_args"] = eval_args
        write_atomic(path, json.dumps(result, indent=1).encode())
        print(f"[curve] step {step}: {evaluate.format_metrics(result)}", flush=True)
        results.append(result)
    return results


def write_curve(run: Path, results: list[dict], loss: list[tuple[int, float]]) -> list[Path]:
    """curve.csv (step, every column, the real clips' IQA and Sync-D) and curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run / "eval" / "curve"
    buffer = io.StringIO()
    table = csv.writer(buffer)
    table.writerow(["step", *evaluate.COLUMNS, "IQA_ci95", "real_IQA", "real_Sync-D"])
    for r in results:
        table.writerow([r["step"], *(r["metrics"][c] for c in evaluate.COLUMNS), r["metrics"]["IQA_ci95"],
                        r["ground_truth"]["IQA"], r["ground_truth"]["Sync-D"]])
    written = [write_atomic(out / "curve.csv", buffer.getvalue().encode())]
    steps = [r["step"] for r in results]
    panels = [*PLOTTED, "val/loss"] if loss else list(PLOTTED)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3))
    for ax, name in zip(axes, panels):
        if name == "val/loss":
            ax.plot(*zip(*loss), marker=".")
        else:
            ax.plot(steps, [r["metrics"][name] for r in results], marker="o")
            if name in ("IQA", "Sync-D"):
                ax.axhline(results[-1]["ground_truth"][name], color="gray", linestyle="--", label="real clips")
                ax.legend(fontsize=7)
        ax.set_title(f"{name} ({'lower' if evaluate.LOWER_IS_BETTER.get(name, True) else 'higher'} is better)", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run), fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    written.append(write_atomic(out / "curve.png", image.getvalue()))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="fada curve", description=__doc__.split("\n\n")[0],
                                epilog="Other options go to `fada evaluate` (--clips, --frames, --config, ...).")
    p.add_argument("run", help="a run folder (…/tb/run) or its checkpoints folder")
    p.add_argument("--every", type=int, default=0, help="only checkpoints at multiples of this step")
    args, eval_args = p.parse_known_args(argv)
    run = Path(args.run)
    run = run.parent if run.name == "checkpoints" else run
    try:
        results = evaluate_checkpoints(run, kept_checkpoints(run, args.every), eval_args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"fada curve: {err}") from None
    written = write_curve(run, results, held_out_loss(run))
    print(f"{'step':>7} " + " ".join(f"{c:>8}" for c in evaluate.COLUMNS[1:]))
    for r in results:
        print(f"{r['step']:>7} " + " ".join(f"{r['metrics'][c]:>8.4g}" for c in evaluate.COLUMNS[1:]))
    print(f"real clips: IQA {results[-1]['ground_truth']['IQA']:.4g}, Sync-D {results[-1]['ground_truth']['Sync-D']:.4g}")
    print(f"[curve] wrote {', '.join(map(str, written))}")
    return written
