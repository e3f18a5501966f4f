"""`fada ablate`: train and evaluate every row of an ablation at each training seed, then write the table
(Markdown, CSV: mean ± SD over seeds), summary.json, frames.png (a clip's frames, row by row), losses.png
(each trained row's held-out loss against its step) and, for CFG sweeps, PNG plots of FVD and Sync-D
against each scale (FADA's Figures 3 and 4) and best_scale.md.

    fada ablate --config tables/distillers.yaml            # every row and seed, in order; finished ones are skipped
    fada ablate --config tables/distillers.yaml --quick    # two rows, seed 0, few steps: a first look, and CI's check
    fada ablate --config tables/mixed.yaml --row "Adaptive-0.25" --seed 1   # one row at one seed (a cluster job) ...
    fada ablate --config tables/mixed.yaml --collect       # ... then the table from the finished rows and seeds
    fada ablate --config tables/mixed.yaml --jobs 2        # two runs at once (one machine: cores or GPUs shared)
    fada ablate --config tables/mixed.yaml --status      # where each row and seed is; writes nothing
    fada ablate --collect --config tables/distillers.yaml --config tables/mixed.yaml   # ... + claims.md: all claims
    fada ablate --config tables/distillers.yaml --config tables/mixed.yaml --jobs 2    # both tables' runs, one queue

An ablation YAML names its rows; each row trains with `fit` (configs, as `fada fit --config`) plus
`overrides` (dotted keys), or re-evaluates another row's checkpoint (`checkpoint_of`) with other
`evaluate` arguments; `teacher: ROW` hands that row's checkpoint to a distiller, `student: ROW` starts
the student from that row's (a distiller's, for a second stage). `seeds: N` (top level, or a row's own)
trains each row N times, at seeds 0..N-1 (`seed_everything` and the data's shuffle seed); seed s of a row
uses seed s of the rows it depends on, so each seed replicates the whole pipeline. A row's run folder is
<out>/<row slug>/seed<s> (or <its `run`>/seed<s>, so tables can share a teacher); it is finished when its
result.json exists, and a stopped row resumes from its last checkpoint. `record: DIR` also keeps each
result (with its held-out loss curve) in DIR, to commit: a recorded row stays finished when its run
folder is lost. A result names its evaluated checkpoint and the ones it was built on (its teacher's,
its first stage's) by SHA-256, so rows trained on a retrained teacher can be told apart.
`keep_checkpoints: used` deletes a trained row's checkpoints but the evaluated one and last.ckpt once it
is evaluated (default `all`).

`claims:` lists the paper's orderings, {claim: TEXT, better: ROW, than: ROW, columns: [COLUMN, ...]}, and
table.md judges each column against the spread over training seeds (`judge`): holds, does not hold,
or cannot tell.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml

from . import cli, curve, evaluate
from .presets import find_config
from .video_io import write_atomic

QUICK = {"rows": 2,  # unless the YAML lists its `quick` rows
         "fit_overrides": {"trainer.max_steps": 6, "trainer.val_check_interval": 6,
                                      "data.init_args.batch_size": 2, "data.init_args.epoch_samples": 16},
         "eval_overrides": {"clips": 4, "frames": 16, "batch_size": 4, "videos": 1}}
SCALE_NAMES = {"audio_scale": "s_a", "ref_scale": "s_r"}
ROW_KEYS = {"name", "fit", "overrides", "run", "teacher", "student", "reference", "checkpoint_of", "evaluate", "seeds",
            "sweep"}
DEPENDENCIES = ("teacher", "student", "checkpoint_of")  # row keys naming a row whose checkpoint this row needs
SWEEP_KEYS = {"model", "models", "fixed", "audio_scale", "ref_scale", "best_by"}
CLAIM_KEYS = {"claim", "better", "than", "columns"}  # not `on`: YAML reads it as true
QUALITY = tuple(c for c in evaluate.COLUMNS if c != "NFE-D")  # a claim's columns unless it names some
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "cannot tell"
LOCK = "running.lock"  # in a row's seed folder: held (flock) by the process running it, with its pid inside
EVAL_JSON = "eval/result.json"  # in a row's seed folder; evaluate writes the sample clips beside it
TRAIN_THREADS = "train_threads.json"  # in a row's seed folder: [intra-op threads of each start of its training]
FRAME_STRIDE = 2      # frames.png shows every 2nd frame of the clip
FRAME_MIN_PX = 128    # ... each upscaled (nearest neighbour, an integer factor) to at least this many px
LABEL_PX, LABEL_CHARS, STRIP_GAP_PX, DPI = 240, 24, 8, 100  # frames.png: name column (px, wrap), gap, px per inch


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, or of a sharded (FSDP2) checkpoint folder: each file's path below it, then its bytes."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_")


def seed_count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: seeds must be a whole number >= 1 (seeds 0..N-1 are trained), not {value!r}")
    return value


def sweep_rows(path: Path, sweep: dict, rows: list[dict]) -> list[dict]:
    """The `sweep:` block -> evaluate-only rows "<model> s_a=<v>" / "<model> s_r=<v>", model by model; a
    sweep point is a reference when its model is. Normalises the block: `models` (a list), `best_by`."""
    unknown = sorted(set(sweep) - SWEEP_KEYS)
    if unknown:
        raise ValueError(f"{path}: sweep has unknown keys {unknown} (a sweep takes {', '.join(sorted(SWEEP_KEYS))})")
    if ("model" in sweep) == ("models" in sweep):
        raise ValueError(f"{path}: sweep needs exactly one of `model: ROW` or `models: [ROW, ...]`")
    models = [sweep["model"]] if "model" in sweep else sweep["models"]
    if not isinstance(models, list) or not models:
        raise ValueError(f"{path}: sweep `models` must be a non-empty list of row names, not {models!r}")
    if set(sweep.get("fixed") or {}) != set(SCALE_NAMES):
        raise ValueError(f"{path}: sweep needs `fixed: {{ref_scale: .., audio_scale: ..}}` (the scale not swept)")
    sweep["models"], sweep["best_by"] = models, sweep.get("best_by", "FVD")
    if sweep["best_by"] not in evaluate.COLUMNS:
        raise ValueError(f"{path}: sweep best_by {sweep['best_by']!r} is not one of {', '.join(evaluate.COLUMNS)}")
    reference = {row.get("name") for row in rows if row.get("reference")}
    return [{"name": f"{model} {SCALE_NAMES[scale]}={value:g}", "checkpoint_of": model,
             "evaluate": {**sweep["fixed"], scale: float(value)}, "sweep": scale,
             **({"reference": True} if model in reference else {})}
            for model in models for scale in SCALE_NAMES for value in sweep.get(scale, [])]


def load_ablation(path: str | Path) -> dict:
    """The ablation YAML, with its CFG sweeps expanded into evaluate-only rows and every row's `seeds`
    resolved (a sweep point runs its model's); checked for clear errors."""
    path = find_config(path)
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list) or not spec["rows"]:
        raise ValueError(f"{path}: an ablation needs a non-empty list `rows`")
    spec.setdefault("name", Path(path).stem)
    spec.setdefault("out", f"runs/ablation/{spec['name']}")
    spec.setdefault("evaluation", ["eval/synthetic.yaml"])
    spec.setdefault("record", None)
    spec.setdefault("keep_checkpoints", "all")
    if spec["keep_checkpoints"] not in ("all", "used"):
        raise ValueError(f"{path}: keep_checkpoints is 'all' (every checkpoint a run's config keeps) or 'used' "
                         f"(only the evaluated one and last.ckpt, once a row is evaluated), not {spec['keep_checkpoints']!r}")
    spec["seeds"] = seed_count(spec.get("seeds", 1), f"{path}: top-level")
    rows = [dict(row) for row in spec["rows"]]
    if spec.get("sweep"):  # {models: [ROW, ...], fixed: {ref_scale, audio_scale}, audio_scale: [...], ref_scale: [...]}
        rows += sweep_rows(path, spec["sweep"], rows)
    names = [row.get("name") for row in rows]
    for i, row in enumerate(rows):
        if not row.get("name"):
            raise ValueError(f"{path}: row {i + 1} has no name")
        unknown = sorted(set(row) - ROW_KEYS)
        if unknown:  # {name: A, B, fit: ...} parses as name "A" and a key "B": quote names holding a comma
            raise ValueError(f"{path}: row {row['name']!r} has unknown keys {unknown} (a row takes "
                             f"{', '.join(sorted(ROW_KEYS - {'sweep'}))}; a name with a comma inside {{...}} needs quotes)")
        if ("fit" in row) == ("checkpoint_of" in row):
            raise ValueError(f"{path}: row {row['name']!r} needs exactly one of `fit` (configs to train) or "
                             f"`checkpoint_of` (a row whose checkpoint it evaluates)")
        for key in DEPENDENCIES:
            if key in row and row[key] not in names[:i]:
                raise ValueError(f"{path}: row {row['name']!r}: {key} {row[key]!r} is not a row above it "
                                 f"(rows: {', '.join(names[:i]) or 'none'})")
        default = rows[names.index(row["checkpoint_of"])]["seeds"] if "sweep" in row else spec["seeds"]
        row["seeds"] = seed_count(row.get("seeds", default), f"{path}: row {row['name']!r}")
        for key in DEPENDENCIES:
            needed = rows[names.index(row[key])] if key in row else None
            if needed is not None and needed["seeds"] < row["seeds"]:
                raise ValueError(f"{path}: row {row['name']!r} runs {row['seeds']} seeds but its {key} "
                                 f"{needed['name']!r} only {needed['seeds']} (seed s of a row uses seed s of the rows "
                                 f"it depends on): give {needed['name']!r} seeds: {row['seeds']} or "
                                 f"{row['name']!r} seeds: {needed['seeds']}")
        for config in row.get("fit", []):
            find_config(config)  # a missing config fails here, before any training
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names repeat: {names}")
    spec["claims"] = [check_claim(path, claim, names) for claim in spec.get("claims") or []]
    spec.setdefault("quick", names[:QUICK["rows"]])  # the rows --quick runs: a teacher and a student, say
    unknown = [name for name in spec["quick"] if name not in names]
    if unknown:
        raise ValueError(f"{path}: quick names rows that do not exist: {unknown}")
    spec["rows"] = rows
    return spec


def check_claim(path: Path, claim: dict, names: list[str]) -> dict:
    """A `claims:` entry with its rows checked and its columns resolved (default: every quality column)."""
    if not isinstance(claim, dict) or not {"claim", "better", "than"} <= set(claim) or set(claim) - CLAIM_KEYS:
        raise ValueError(f"{path}: a claim is {{claim: TEXT, better: ROW, than: ROW, columns: [COLUMN, ...]}} "
                         f"(`columns` optional), not {claim!r}")
    for key in ("better", "than"):
        if claim[key] not in names:
            raise ValueError(f"{path}: claim {claim['claim']!r}: {key} {claim[key]!r} is not a row "
                             f"(rows: {', '.join(names)})")
    columns = claim.get("columns", list(QUALITY))
    if not columns or any(c not in QUALITY for c in columns):
        raise ValueError(f"{path}: claim {claim['claim']!r}: columns {columns!r} must be some of {', '.join(QUALITY)}")
    return {**claim, "columns": list(columns)}


def judge(better: list[float], than: list[float], lower_is_better: bool) -> str:
    """Is `better` better than `than` beyond the spread over training seeds? Each list holds one value per
    seed. HOLDS when every seed of `better` beats every seed of `than` (their ranges do not overlap),
    FAILS when every seed of `than` beats every seed of `better`, UNDECIDED otherwise, and always with
    fewer than two seeds on a side (no spread measured). With 3 seeds a side, ranges that do not overlap
    happen by chance 1 time in 20 in a given direction (2 of the 20 ways to split 6 ranked values)."""
    if min(len(better), len(than)) < 2:
        return UNDECIDED
    sign = -1 if lower_is_better else 1  # compare as higher-is-better
    a, b = [sign * v for v in better], [sign * v for v in than]
    return HOLDS if min(a) > max(b) else FAILS if min(b) > max(a) else UNDECIDED


def overall(verdicts: list[str]) -> str:
    """A claim's verdict over its columns: holds (some columns hold, none fails), does not hold (the
    reverse), in part (some of each), cannot tell (no column decided)."""
    held, failed = HOLDS in verdicts, FAILS in verdicts
    return "in part" if held and failed else HOLDS if held else FAILS if failed else UNDECIDED


def verdicts(claim: dict, summaries: dict) -> tuple[dict, str]:
    """A claim judged column by column (`judge`) from the per-seed values in `summaries` -> ({column:
    verdict}, the claim's verdict); ({}, "not judged: ...") while one of its rows has no finished seed."""
    a, b = summaries.get(claim["better"]), summaries.get(claim["than"])
    if a is None or b is None:
        waiting = [name for name, s in ((claim["better"], a), (claim["than"], b)) if s is None]
        return {}, f"not judged: {', '.join(waiting)} not finished"
    by_column = {c: judge(a[c]["values"], b[c]["values"], evaluate.LOWER_IS_BETTER[c]) for c in claim["columns"]}
    return by_column, overall(list(by_column.values()))


def claims_table(claims: list[dict], summaries: dict) -> str:
    """Markdown: each claim's `verdicts`, a column per quality metric."""
    lines = ["### The paper's claims against the spread over training seeds", "",
             "| Claim | " + " | ".join(QUALITY) + " | verdict |", "|---|" + "---|" * (len(QUALITY) + 1)]
    for claim in claims:
        by_column, verdict = verdicts(claim, summaries)
        lines.append(f"| {claim['claim']} | " + " | ".join(by_column.get(c, "") for c in QUALITY) + f" | {verdict} |")
    lines += ["", "A column holds when every training seed of the first row beats every seed of the second (their "
              "ranges over seeds do not overlap), does not hold when the reverse is true, and cannot tell "
              "otherwise or with one seed. A claim holds in part when it holds on some columns and is reversed "
              "on others. Blank: a column the claim is not about."]
    return "\n".join(lines) + "\n"


class RunInProgress(RuntimeError):
    """Another process is running this row at this seed (tables share run folders)."""


@contextlib.contextmanager
def run_lock(folder: Path, label: str):
    """Holds <folder>/running.lock while a row runs at one seed, so two processes (two tables sharing a run
    folder, or two workers) never train into one folder at once: the second stops with RunInProgress. An
    flock ends with its process however the process ends, so a killed run leaves no stale lock."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunInProgress(f"{label} is running in another process (pid {f.read().strip() or '?'}, "
                                f"{folder / LOCK}): wait for it, or stop it and run again to resume") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(folder: Path) -> str | None:
    """The pid of the process running the row in `folder` (holding its lock), or None."""
    if not (folder / LOCK).exists():
        return None
    with open(folder / LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def overview(ablations: list[Ablation], configs: list[str]) -> str:
    """Markdown: every claim of several ablations with its verdict (`verdicts`), and the time of every run
    behind them, each run folder counted once (tables share teachers and students)."""
    lines = ["### The paper's claims, every table", "", "Made with `fada ablate --collect "
             + " ".join(f"--config {c}" for c in configs) + "`.", "",
             "| Table | Claim | verdict | holds on | does not hold on |", "|---|---|---|---|---|"]
    runs: dict[Path, dict] = {}
    for ablation in ablations:
        results = ablation.results()
        summaries = {row["name"]: summarize(by_seed) for row, by_seed in results if by_seed}
        for claim in ablation.spec["claims"]:
            by_column, verdict = verdicts(claim, summaries)
            on = [", ".join(c for c, v in by_column.items() if v == kind) for kind in (HOLDS, FAILS)]
            table = ablation.spec.get("title", ablation.spec["name"]).split(":")[0]  # "Table 2 (micro)"
            lines.append(f"| {table} | {claim['claim']} | {verdict} | "
                         f"{on[0]} | {on[1]} |")
        runs.update({ablation.run_dir(row, seed).resolve(): result for row, by_seed in results
                     for seed, result in by_seed.items()})
    seconds = run_seconds(list(runs.values()))
    lines += ["", "Columns as in each table's claims (holds: every training seed of the first row beats every seed "
              "of the second). Time of the {} finished runs behind these tables on this machine, each counted once: "
              "training {:.2f} h, evaluation {:.2f} h wall; CPU time (wall x threads) {:.2f} h.".format(
                  len(runs), *(seconds[part] / 3600 for part in ("train", "eval", "cpu")))]
    return "\n".join(lines) + "\n"


class Ablation:
    """Runs the rows of one ablation spec at their seeds (`seeds`: only these; `quick`: QUICK's rows,
    steps and clips at seed 0 unless `seeds` says otherwise, in <out>-quick)."""

    def __init__(self, spec: dict, quick: bool = False, progress: bool = True, seeds: list[int] | None = None):
        self.spec, self.quick, self.progress = spec, quick, progress
        self.out = Path(spec["out"] + ("-quick" if quick else ""))
        self.records = Path(spec["record"]) if spec.get("record") and not quick else None
        self.by_name = {row["name"]: row for row in spec["rows"]}
        self.rows = [self.by_name[name] for name in spec["quick"]] if quick else spec["rows"]
        self.only_seeds = sorted(set(seeds)) if seeds else ([0] if quick else None)
        most = max(row["seeds"] for row in self.rows)
        if self.only_seeds and not set(self.only_seeds) <= set(range(most)):
            raise ValueError(f"no seed {sorted(set(self.only_seeds) - set(range(most)))} in ablation {spec['name']!r} "
                             f"(its rows have seeds 0..{most - 1})")
        for row in self.rows:
            self.record_path(row, 0)  # every run folder has its place under `record`

    def seeds(self, row: dict) -> list[int]:
        """The seeds of `row` this run trains and evaluates: 0..seeds-1, or those of --seed."""
        return [s for s in range(row["seeds"]) if self.only_seeds is None or s in self.only_seeds]

    def table_seeds(self, row: dict) -> list[int]:
        """The seeds of `row` the outputs cover: all of them, whichever --seed ran (jobs at different seeds
        each rewrite one table of every finished run), except in --quick's first look (the seeds it ran)."""
        return self.seeds(row) if self.quick else list(range(row["seeds"]))

    def run_dir(self, row: dict, seed: int) -> Path:
        if "checkpoint_of" in row or "run" not in row:
            return self.out / slug(row["name"]) / f"seed{seed}"
        return Path(row["run"] + ("-quick" if self.quick else "")) / f"seed{seed}"

    def tensorboard(self, row: dict, seed: int) -> Path:
        """The training run's folder (TensorBoard events, checkpoints/) of a row with `fit`."""
        return self.run_dir(row, seed) / "tb" / "run"

    def last_checkpoint(self, row: dict, seed: int) -> Path:
        """Where a stopped run resumes from."""
        return self.tensorboard(row, seed) / "checkpoints" / "last.ckpt"

    def checkpoint(self, row: dict, seed: int) -> Path:
        """The row's model at `seed`, the one evaluated and handed on (as a teacher or a starting student):
        the lowest held-out loss of the run where its config keeps it (budgets/plateau.yaml's best.ckpt),
        else where it stopped."""
        if "checkpoint_of" in row:
            return self.checkpoint(self.by_name[row["checkpoint_of"]], seed)
        best = self.tensorboard(row, seed) / "checkpoints" / "best.ckpt"
        return best if best.exists() else self.last_checkpoint(row, seed)

    def trained(self, row: dict, seed: int) -> bool:
        """Has the training behind `row`'s model finished at `seed`? Only then is its checkpoint final: a
        run in progress (another job's) already has a last.ckpt and a best.ckpt."""
        if "checkpoint_of" in row:
            return self.trained(self.by_name[row["checkpoint_of"]], seed)
        return (self.run_dir(row, seed) / "trained").exists()

    def record_path(self, row: dict, seed: int) -> Path | None:
        """Where `record` keeps the row's result at `seed`: <record>/<run folder below the tables' common
        folder>.json (runs/ablation/teacher_a/seed0 -> <record>/teacher_a/seed0.json), or None without one."""
        if self.records is None:
            return None
        folder, base = self.run_dir(row, seed), self.out.parent
        if not folder.resolve().is_relative_to(base.resolve()):
            raise ValueError(f"row {row['name']!r}: its run folder {folder} is not under {base}, the folder that "
                             f"holds the table's {self.out.name}/, so `record` has no place for it")
        return self.records / folder.resolve().relative_to(base.resolve()).with_suffix(".json")

    def result(self, row: dict, seed: int) -> dict | None:
        """The row's result at `seed` from its run folder, else from its record (the folder lost), or None."""
        for path in (self.run_dir(row, seed) / "result.json", self.record_path(row, seed)):
            if path is not None and path.exists():
                return json.loads(path.read_text())
        return None

    def only_recorded(self, row: dict, seed: int) -> bool:
        """Is the row's result at `seed` in its record alone, its run folder (and checkpoint) gone?"""
        record = self.record_path(row, seed)
        return (record is not None and record.exists()
                and not (self.run_dir(row, seed) / "result.json").exists())

    def keep(self, row: dict, seed: int, result: dict) -> None:
        """Writes the row's result at `seed` into its run folder and, with `record`, its record."""
        write_atomic(self.run_dir(row, seed) / "result.json", json.dumps(result, indent=1).encode())
        self.write_record(row, seed, result)

    def write_record(self, row: dict, seed: int, result: dict) -> None:
        """With `record`: the result with its held-out loss curve, a small file to commit beside the results
        page, so a table and its claims survive the loss of the run folders (checkpoints are not committed);
        and, but for a sweep point, its first sample clip, for frames.png (`record_clip`)."""
        record = self.record_path(row, seed)
        if record is not None:
            kept = {**result, "held_out_loss": self.held_out_loss(row, seed)}
            write_atomic(record, (json.dumps(kept, indent=1) + "\n").encode())
            self.record_clip(row, seed)

    def sample_clips(self, row: dict, seed: int) -> dict[str, Path]:
        """{key: evaluate's PNG of that sample clip} of the row at `seed`, from its run folder, else the one
        clip its record keeps (<record stem>-<key>.png)."""
        tag = Path(EVAL_JSON).stem  # evaluate names a sample clip <tag>-<key>.png
        found = {png.stem.removeprefix(f"{tag}-"): png
                 for png in (self.run_dir(row, seed) / EVAL_JSON).parent.glob(f"{tag}-*.png")}
        record = self.record_path(row, seed)
        if not found and record is not None:
            found = {png.stem.removeprefix(f"{record.stem}-"): png for png in record.parent.glob(f"{record.stem}-*.png")}
        return found

    def record_clip(self, row: dict, seed: int) -> None:
        """Copies the row's first sample clip (sorted key; ~50 KB, lossless) from its run folder beside its
        record, replacing one kept of an earlier training (a retraining's record replaces its record): frames.png
        outlives the run folder. Not for sweep points (frames.png leaves them out)."""
        record = self.record_path(row, seed)
        clips = self.sample_clips(row, seed)
        if record is None or "sweep" in row or not clips:
            return
        key = min(clips)
        kept = record.with_name(f"{record.stem}-{key}.png")
        if clips[key] != kept and (not kept.exists() or kept.read_bytes() != clips[key].read_bytes()):
            write_atomic(kept, clips[key].read_bytes())

    def held_out_loss(self, row: dict, seed: int) -> list:
        """[(step, val/loss)] of a training row at `seed`: from its TensorBoard events, else from its record; the
        record's when the result is the record's alone (a retraining of a lost run folder has begun anew)."""
        if "fit" not in row:
            return []
        if self.tensorboard(row, seed).exists() and not self.only_recorded(row, seed):
            return [list(point) for point in curve.held_out_loss(self.tensorboard(row, seed))]
        record = self.record_path(row, seed)
        return json.loads(record.read_text()).get("held_out_loss", []) if record and record.exists() else []

    def gone(self, need: dict, seed: int) -> str:
        """Why `need` at `seed` is not trained, when its result survives only in its record: the fix."""
        if not self.only_recorded(need, seed):
            return ""
        return (f" (its result is recorded in {self.record_path(need, seed)}, but its run folder and checkpoint are "
                f"gone: delete that record and run {need['name']!r} at seed {seed} again to retrain it)")

    # ---- one row at one seed ---------------------------------------------------------------------
    def run_row(self, row: dict, seed: int) -> dict:
        """Trains (or resumes) and evaluates `row` at `seed`, unless finished; one process at a time (`run_lock`)."""
        label = f"{row['name']} (seed {seed})"
        if self.result(row, seed) is None:
            with run_lock(self.run_dir(row, seed), f"row {label}"):
                return self.run_unlocked(row, seed, label)
        return self.run_unlocked(row, seed, label)

    def run_unlocked(self, row: dict, seed: int, label: str) -> dict:
        done = self.result(row, seed)
        if done is not None:
            where = self.record_path(row, seed) if self.only_recorded(row, seed) else self.run_dir(row, seed) / "result.json"
            print(f"[ablate] {label}: finished earlier ({where}), skipped")
            return done
        twin = self.twin(row, seed)
        if twin is not None:  # the same checkpoint, sampler and noise: evaluated once
            done = self.result(twin, seed)
            result = {**done, "row": row["name"], "seconds_train": 0.0, "seconds_eval": 0.0, "same_as": twin["name"],
                      "built_on": {row["checkpoint_of"]: done.get("checkpoint_sha256")}}
            self.keep(row, seed, result)
            print(f"[ablate] {label}: the same evaluation as {twin['name']!r}: {evaluate.format_metrics(result)}")
            return result
        if "fit" in row:
            self.train(row, seed)
        elif not self.trained(row, seed):
            need = self.by_name[row["checkpoint_of"]]
            raise FileNotFoundError(f"row {row['name']!r} evaluates the checkpoint of {need['name']!r} "
                                    f"({self.checkpoint(row, seed)}), which is not trained yet: run that row first"
                                    + self.gone(need, seed))
        began = time.perf_counter()
        result = self.evaluate(row, seed)
        trained = curve.training_seconds(self.tensorboard(row, seed)) if "fit" in row else 0.0
        # threads: the intra-op threads this process ran on (CPU time ~ wall x threads); train_threads: each
        # start's of the training (a run resumed on another count is not the uninterrupted run's model)
        result.update(row=row["name"], seed=seed, seconds_train=round(trained, 1),
                      seconds_eval=round(time.perf_counter() - began, 1), threads=torch.get_num_threads(),
                      **({"train_threads": self.train_threads(row, seed)} if "fit" in row else {}),
                      checkpoint_sha256=self.checkpoint_identity(row, seed),
                      built_on={need["name"]: self.checkpoint_identity(need, seed) for need in self.needs(row)})
        self.keep(row, seed, result)
        if "fit" in row and self.spec.get("keep_checkpoints") == "used":
            self.drop_unused_checkpoints(row, seed)
        print(f"[ablate] {label}: {evaluate.format_metrics(result)}")
        return result

    def checkpoint_identity(self, row: dict, seed: int) -> str | None:
        """SHA-256 of the trained row's checkpoint at `seed` (the one the rows that need it load), else the one
        its result recorded (its run folder gone), else None (recorded before results named checkpoints)."""
        path = self.checkpoint(row, seed)
        if path.exists():
            return checkpoint_sha256(path)
        return (self.result(row, seed) or {}).get("checkpoint_sha256")

    def drop_unused_checkpoints(self, row: dict, seed: int) -> None:
        """`keep_checkpoints: used`: of an evaluated row's checkpoints, only those the tables use stay, the
        evaluated one (handed on to the rows that need it) and last.ckpt (a teacher's checkpoint every 250
        steps, kept for its curve, is 3 GB a seed at micro scale)."""
        used = {self.checkpoint(row, seed), self.last_checkpoint(row, seed)}
        for path in self.last_checkpoint(row, seed).parent.glob("*.ckpt"):
            if path not in used:  # a sharded (FSDP2) checkpoint is a folder
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def twins(self, row: dict) -> list[dict]:
        """The rows whose evaluation may be this evaluate-only row's: the other evaluate-only rows of the same
        model and settings (a sweep's fixed point is in both figures), and the model's own row when it is
        evaluated at its sampler's defaults (a student's are the sweep's fixed point), known once it is."""
        if "checkpoint_of" not in row:
            return []
        model = self.by_name[row["checkpoint_of"]]
        return [other for other in self.by_name.values() if other is not row
                and other.get("checkpoint_of") == row["checkpoint_of"] and other.get("evaluate") == row.get("evaluate")
                ] + ([model] if "evaluate" not in model else [])

    def twin(self, row: dict, seed: int) -> dict | None:
        """A twin (`twins`) finished at `seed` whose result is this row's too, or None: the model's own row only
        when its recorded sampler ran at this row's `evaluate` settings."""
        for other in self.twins(row):
            done = self.result(other, seed)
            if done is not None and ("checkpoint_of" in other or sampled_at(done, row.get("evaluate", {}))):
                return other
        return None

    def needs(self, row: dict) -> list[dict]:
        """The rows whose trained models `row` needs at its seed: its teacher, the student it starts from, or
        the row whose checkpoint it evaluates."""
        return [self.by_name[row[key]] for key in DEPENDENCIES if key in row]

    def train(self, row: dict, seed: int) -> None:
        """`fada fit` into the row's seed folder, resuming from its last checkpoint if a run was stopped."""
        root, ckpt = self.run_dir(row, seed), self.last_checkpoint(row, seed)
        if (root / "trained").exists():
            return
        for need in self.needs(row):
            if not self.trained(need, seed):
                raise FileNotFoundError(f"row {row['name']!r} at seed {seed} needs {need['name']!r}, whose training "
                                        f"({self.run_dir(need, seed)}) has not finished yet: run that row (that "
                                        f"seed) first" + self.gone(need, seed))
        args = self.fit_args(row, seed)
        threads, began_on = torch.get_num_threads(), []  # a start from scratch begins the list anew
        if ckpt.exists():
            print(f"[ablate] {row['name']} (seed {seed}): resuming from {ckpt}")
            args.append(f"--ckpt_path={ckpt}")
            began_on = self.train_threads(row, seed)
            if began_on and threads != began_on[0]:  # CPU sums split over another number of threads round apart
                print(f"[ablate] {row['name']} (seed {seed}): warning: resuming on {threads} threads where it began "
                      f"on {began_on[0]}: the model will differ from an uninterrupted run's (set OMP_NUM_THREADS="
                      f"{began_on[0]} to match)")
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / TRAIN_THREADS, json.dumps(began_on + [threads]).encode())
        print(f"[ablate] {row['name']} (seed {seed}): fada {' '.join(args)}")
        cli.main(args)
        if not ckpt.exists():
            raise RuntimeError(f"row {row['name']!r}: training ended without {ckpt} (does its config keep a "
                               f"last checkpoint? the row needs FinalCheckpoint with save_last)")
        (root / "trained").touch()

    def train_threads(self, row: dict, seed: int) -> list[int]:
        """The intra-op threads of each start of the row's training at `seed`, in order ([] before the first)."""
        path = self.run_dir(row, seed) / TRAIN_THREADS
        return json.loads(path.read_text()) if path.exists() else []

    def fit_args(self, row: dict, seed: int) -> list[str]:
        """The `fada fit` command line of a training row at `seed`: its configs, overrides, the seed (of
        the initialisation and of the data stream's shuffle), its teacher's checkpoint at that seed, its folder."""
        root = self.run_dir(row, seed)
        args = ["fit"]
        for config in row["fit"]:
            args += ["--config", config]
        overrides = {**row.get("overrides", {}), **(QUICK["fit_overrides"] if self.quick else {}),
                     "seed_everything": seed, "data.init_args.seed": seed}
        for key in ("teacher", "student"):
            if key in row:
                overrides[f"model.init_args.{key}_ckpt"] = str(self.checkpoint(self.by_name[row[key]], seed))
        overrides.update({"trainer.default_root_dir": str(root), "trainer.logger.init_args.save_dir": str(root),
                          "trainer.logger.init_args.name": "tb", "trainer.logger.init_args.version": "run"})
        return args + [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}"
                       for key, value in overrides.items()]

    def evaluate(self, row: dict, seed: int) -> dict:
        """`fada evaluate` of the row's checkpoint at `seed`; the sampling noise is the same at every seed,
        so seeds differ by training alone."""
        args = ["--ckpt", str(self.checkpoint(row, seed)), "--out", str(self.run_dir(row, seed) / EVAL_JSON)]
        for config in self.spec["evaluation"] if isinstance(self.spec["evaluation"], list) else [self.spec["evaluation"]]:
            args += ["--config", config]
        settings = {**self.spec.get("eval_overrides", {}), **row.get("evaluate", {}),
                    **(QUICK["eval_overrides"] if self.quick else {})}
        args += [f"--{key}={json.dumps(value)}" for key, value in settings.items()]
        return evaluate.run(args, progress=self.progress)

    def status(self, row: dict, seed: int, now: float | None = None) -> str:
        """Where `row` is at `seed`, for --status: finished, trained (not evaluated), in progress or stopped
        (its last validation and the age of last.ckpt, from which it resumes), waiting, or not started."""
        if self.result(row, seed) is not None:
            if not self.only_recorded(row, seed):
                return "finished"
            # the record counts (the row is skipped) until it is deleted: then a retraining begun there resumes
            folder = ("holds a retraining, which resumes once that record is deleted"
                      if self.tensorboard(row, seed).exists() else
                      "holds no training" if self.run_dir(row, seed).exists() else "is gone")
            return f"finished (recorded in {self.record_path(row, seed)}; its run folder {folder})"
        pid = lock_holder(self.run_dir(row, seed))
        running = f"running (pid {pid}): " if pid else ""
        untrained = [need for need in self.needs(row) if not self.trained(need, seed)]
        # a need whose run folder is gone though its result is recorded never trains by itself: say so
        waiting = ", ".join(need["name"] for need in untrained) + "".join(self.gone(need, seed) for need in untrained)
        if "fit" not in row or self.trained(row, seed):
            return running + ("evaluating" if running else f"waiting for {waiting}" if waiting else
                              "trained, not evaluated" if "fit" in row else "ready to evaluate")
        last = self.last_checkpoint(row, seed)
        if not last.exists():
            return running + ("training, no checkpoint yet" if running else f"waiting for {waiting}" if waiting else
                              "not started")
        minutes = ((now or time.time()) - last.stat().st_mtime) / 60
        losses = curve.held_out_loss(self.tensorboard(row, seed))
        state = running + "training" if running else "stopped (resumes from last.ckpt)"
        if not losses:
            return f"{state}, no validation yet (last.ckpt written {minutes:.0f} min ago)"
        (step, value), (best_step, best) = losses[-1], min(losses, key=lambda point: point[1])
        return (f"{state}: val/loss {value:.4g} after {step + 1} steps, best {best:.4g} after "
                f"{best_step + 1} (last.ckpt written {minutes:.0f} min ago)")

    # ---- several runs at once (--jobs N) ---------------------------------------------------------
    def job_command(self, row: dict, seed: int, config: str) -> list[str]:
        """One row at one seed as its own `fada ablate` process."""
        return [sys.executable, "-m", "fada_lightning.cli", "ablate", "--config", config,
                *(["--quick"] if self.quick else []), "--row", row["name"], "--seed", str(seed)]

    def start_job(self, job: Job, threads: str, gpu: str | None) -> tuple:
        env = {**os.environ, "OMP_NUM_THREADS": threads, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
        job.folder.mkdir(parents=True, exist_ok=True)
        log = open(job.folder / "ablate.log", "a")
        # its own session: Ctrl-C reaches the queue alone, which stops the run with SIGTERM (saved at its step)
        process = subprocess.Popen(self.job_command(job.row, job.seed, job.config), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        print(f"[ablate] {job}: started on {threads} threads" + (f", GPU {gpu}" if gpu is not None else "")
              + f"; log {log.name}", flush=True)
        return process, job, log

    # ---- the outputs -----------------------------------------------------------------------------
    def results(self) -> list[tuple[dict, dict[int, dict]]]:
        """[(row, {seed: result})] of every row, over the seeds the outputs cover (`table_seeds`) that finished."""
        return [(row, {s: r for s in self.table_seeds(row) if (r := self.result(row, s)) is not None})
                for row in self.rows]

    def write_outputs(self) -> list[Path]:
        """table.md, table.csv, summary.json, frames.png, losses.png and, with a sweep, one PNG per swept
        scale and best_scale.md, from the finished rows and seeds (`table_seeds`)."""
        runs = self.results()
        finished = [(row, by_seed) for row, by_seed in runs if by_seed]
        if not finished:
            raise FileNotFoundError(f"no finished rows under {self.out} yet")
        for row, by_seed in finished:  # a result from before `record` was set gets its record (and clip)
            for seed, result in by_seed.items():
                if (record := self.record_path(row, seed)) is not None and not record.exists():
                    self.write_record(row, seed, result)
                self.record_clip(row, seed)
        summaries = {row["name"]: summarize(by_seed) for row, by_seed in finished}
        missing = [row["name"] for row, by_seed in runs if not by_seed and self.table_seeds(row)]
        partial = [f"{row['name']} ({len(by_seed)} of {len(self.table_seeds(row))} seeds)"
                   for row, by_seed in finished if len(by_seed) < len(self.table_seeds(row))]
        first = next(iter(finished[0][1].values()))
        table = markdown_table(self.spec.get("title", self.spec["name"]), [(row, summaries[row["name"]])
                               for row, _ in finished], first["depends_on"], missing, partial, self.quick)
        if self.spec["claims"]:
            table += "\n" + claims_table(self.spec["claims"], summaries)
        written = [write_atomic(self.out / "table.md", table.encode()),
                   write_atomic(self.out / "table.csv", csv_table(finished).encode()),
                   write_atomic(self.out / "summary.json", json.dumps(summaries, indent=1).encode())]
        curves = sweep_curves([(row, summaries[row["name"]]) for row, _ in finished])
        for scale, by_model in curves.items():
            written.append(plot_sweep(self.out / f"sweep_{scale}.png", scale, by_model))
        if curves:
            sweep = self.spec["sweep"]
            written.append(write_atomic(self.out / "best_scale.md",
                                        best_scale_table(curves, sweep["best_by"], sweep["fixed"]).encode()))
        losses = {row["name"]: {s: loss for s in by_seed if (loss := self.held_out_loss(row, s))}
                  for row, by_seed in finished if "fit" in row}
        if any(losses.values()):
            written.append(plot_losses(self.out / "losses.png", {name: by_seed for name, by_seed in losses.items()
                                                                  if by_seed}))
        strips = self.frame_strips(finished)
        if strips:
            written.append(write_atomic(self.out / "frames.png", frames_png(strips)))
        return written

    def frame_strips(self, finished: list) -> list[tuple[str, np.ndarray]]:
        """[("real", frames), (row name, frames), ...] of the first sample clip (sorted key) for the non-sweep
        rows that kept it (run folder or record), at the lowest seed every one of them kept, so that a student
        stands beside the teacher it distilled; failing that, each at its own lowest (a seed other than 0 is
        named). frames (T, H, W, 3) uint8 as evaluate saved them (lossless)."""
        clips = {row["name"]: [(seed, self.sample_clips(row, seed)) for seed in sorted(by_seed)]
                 for row, by_seed in finished if "sweep" not in row}
        keys = sorted({key for by_seed in clips.values() for _, found in by_seed for key in found})
        if not keys:
            return []
        kept = {name: {seed: found[keys[0]] for seed, found in by_seed if keys[0] in found}
                for name, by_seed in clips.items()}
        kept = {name: pngs for name, pngs in kept.items() if pngs}
        shared = set.intersection(*map(set, kept.values()))
        strips = []
        for name, pngs in kept.items():
            seed = min(shared or pngs)
            real, fake = read_clip_png(pngs[seed])
            if not strips:
                strips.append(("real", real))
            strips.append((name if seed == 0 else f"{name} (seed {seed})", fake))
        return strips


class Job(NamedTuple):
    """One row of one table at one seed, for --jobs (a run folder shared by tables is one job)."""
    ablation: Ablation
    config: str
    row: dict
    seed: int

    def key(self, row: dict) -> Path:
        """The run folder of `row` (this job's table) at this job's seed: a job's identity across tables."""
        return self.ablation.run_dir(row, self.seed).resolve()

    @property
    def folder(self) -> Path:
        return self.key(self.row)

    @property
    def precedence(self) -> int:
        """0: evaluates a trained model (its own row too, once trained: a resumed queue), 1: trains on one,
        2: trains from scratch (`run_jobs`' order)."""
        if "fit" not in self.row or self.ablation.trained(self.row, self.seed):
            return 0
        return 1 if self.ablation.needs(self.row) else 2

    def __str__(self) -> str:
        return f"{self.row['name']} (seed {self.seed})"


def run_jobs(queue: list[Job], jobs: int, poll: float = 5.0) -> list[str]:
    """Runs the jobs `jobs` at a time, each as its own process (`Ablation.job_command`) on cores / jobs
    threads (OMP_NUM_THREADS, unless set) and its own GPU where there is one per job; a job starts once
    the models it needs at its seed are trained (by a job of any table: tables share run folders).
    Of the jobs ready to start, those that only evaluate a trained model go first (a sweep point, or a
    row whose training finished before the queue was restarted: minutes, where a
    training takes hours), then those that train on one (a student of a trained teacher), then those
    that train from scratch, each in queue order: the models in hand are used before new ones are
    trained, so the comparisons fill in early and fewer checkpoints that other rows need are only on
    this machine.
    Each process appends to <run folder>/ablate.log. Returns the jobs that failed or could not run
    (a model they need did not train)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(
        map(str, range(torch.cuda.device_count())))).split(",") if g]
    waiting, running, failed = list(queue), {}, []  # running: slot -> (process, job, log file)

    def stop(signum, frame):  # `kill PID` ends the queue as Ctrl-C does: through `finally`, which stops its runs
        raise SystemExit(f"fada ablate: stopped by signal {signum}; each run resumes from its last checkpoint")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while waiting or running:
            for slot, (process, job, log) in list(running.items()):
                if process.poll() is not None:
                    del running[slot]
                    log.close()
                    if process.returncode:
                        failed.append(str(job))
                    print(f"[ablate] {job}: " + ("done" if not process.returncode else
                          f"failed (exit {process.returncode}), see {log.name}"), flush=True)
            busy = {job.folder for _, job, _ in running.values()}
            pending = busy | {job.folder for job in waiting}
            for job in sorted(waiting, key=lambda job: job.precedence):  # stable: queue order within each
                ablation, needs = job.ablation, job.ablation.needs(job.row)
                if all(ablation.trained(need, job.seed) for need in needs):
                    # a twin being evaluated (the model's own row: right after its training): wait and copy
                    # its result (run_row) rather than evaluate again
                    if len(running) < jobs and not any(job.key(t) in busy for t in ablation.twins(job.row)):
                        slot = min(set(range(jobs)) - set(running))
                        running[slot] = ablation.start_job(job, threads, gpus[slot] if len(gpus) >= jobs else None)
                        waiting.remove(job)
                        busy.add(job.folder)
                elif not any(job.key(need) in pending for need in needs):
                    waiting.remove(job)
                    failed.append(str(job))
                    print(f"[ablate] {job}: not run: it needs {', '.join(n['name'] for n in needs)} at seed "
                          f"{job.seed}, which did not train" + "".join(ablation.gone(n, job.seed) for n in needs),
                          flush=True)
            if waiting or running:
                time.sleep(poll)
    finally:  # interrupted: stop the runs (each resumes from its last checkpoint) and wait for them
        signal.signal(signal.SIGTERM, previous)
        for process, *_ in running.values():
            process.terminate()
        for process, _, log in running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
    return failed


def sampled_at(result: dict, settings: dict) -> bool:
    """Did the evaluation behind `result` run its sampler at `settings` ({"ref_scale": 2.0, ...})? A setting
    its record does not name (an older record, a data setting) counts as different."""
    sampler = result.get("depends_on", {}).get("sampler", {})
    return all(key in sampler and sampler[key] == value for key, value in settings.items())


def summarize(by_seed: dict[int, dict]) -> dict:
    """{seed: result} -> {"seeds": [...], "steps": [...], "seconds": {"train", "eval", "cpu"}, column: {"mean",
    "sd", "min", "max", "values"}} for every column of evaluate.COLUMNS and IQA_ci95: steps are the evaluated
    checkpoints' training steps, seconds the wall time summed over seeds and cpu the CPU time, wall x the
    run's threads (a result without `threads` ran on torch's default: every core); sd is the sample
    standard deviation over seeds (n - 1 in the denominator), None with one seed."""
    seeds = sorted(by_seed)
    summary: dict = {"seeds": seeds, "steps": [int(by_seed[s]["step"]) for s in seeds],
                     "seconds": run_seconds([by_seed[s] for s in seeds])}
    for column in (*evaluate.COLUMNS, "IQA_ci95"):
        values = [float(by_seed[s]["metrics"][column]) for s in seeds]
        summary[column] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                           "min": min(values), "max": max(values), "values": values}
    return summary


def run_seconds(results: list[dict]) -> dict:
    """{"train", "eval": wall seconds summed over the results, "cpu": CPU seconds, wall x each run's threads
    (a result without `threads` ran on torch's default: every core)}."""
    seconds = {part: sum(r.get(f"seconds_{part}", 0.0) for r in results) for part in ("train", "eval")}
    seconds["cpu"] = sum((r.get("seconds_train", 0.0) + r.get("seconds_eval", 0.0)) * r.get("threads", os.cpu_count())
                         for r in results)
    return seconds


def sweep_curves(summaries: list) -> dict:
    """[(row, summary)] -> {scale: {model: [(scale value, summary)] in value order}} of the sweep points,
    models and scales in the rows' order."""
    curves: dict = {}
    for row, summary in summaries:
        if "sweep" in row:
            curves.setdefault(row["sweep"], {}).setdefault(row["checkpoint_of"], []).append(
                (row["evaluate"][row["sweep"]], summary))
    return {scale: {model: sorted(points, key=lambda point: point[0]) for model, points in by_model.items()}
            for scale, by_model in curves.items()}


def cell(summary: dict, column: str) -> str:
    """mean ± SD over seeds; one seed: the value (IQA ± its 95% interval over clips); NFE-D as counted."""
    stats = summary[column]
    if column == "NFE-D":
        return f"{stats['mean']:g}"
    if stats["sd"] is not None:
        return f"{stats['mean']:.4g} ± {stats['sd']:.2g}"
    return f"{stats['mean']:.4g}" + (f" ± {summary['IQA_ci95']['mean']:.2g}" if column == "IQA" else "")


def steps_cell(summary: dict) -> str:
    """The training steps of the evaluated checkpoints: one number, or the range over seeds."""
    low, high = min(summary["steps"]), max(summary["steps"])
    return f"{low}" if low == high else f"{low}-{high}"


def header(first: list[str], columns: list[str], last: list[str]) -> list[str]:
    """A Markdown table's header and alignment lines: `first` text columns, metric columns with their arrows."""
    arrows = [f"{c} {'↓' if evaluate.LOWER_IS_BETTER[c] else '↑'}" for c in columns]
    return ["| " + " | ".join([*first, *arrows, *last]) + " |", "|" + "---|" * len(first) + "---:|" * (len(columns) + len(last))]


def markdown_table(title: str, summaries: list, depends_on: dict, missing: list[str], partial: list[str],
                   quick: bool) -> str:
    """[(row, summary)] in the ablation's order, FADA's column order (Sync-C added), a seeds column; the
    best mean of each column in bold (reference rows aside)."""
    columns = list(evaluate.COLUMNS)
    best = {}
    for c in columns[1:]:
        means = [s[c]["mean"] for row, s in summaries if not row.get("reference")]
        if means:
            best[c] = min(means) if evaluate.LOWER_IS_BETTER[c] else max(means)
    lines = [f"### {title}" + (" (quick profile: a smoke test, not a result)" if quick else ""), "",
             *header(["Method"], columns, ["steps", "seeds"])]
    for row, s in summaries:
        cells = [f"**{cell(s, c)}**" if best.get(c) == s[c]["mean"] else cell(s, c) for c in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {steps_cell(s)} | {len(s['seeds'])} |")
    d = depends_on
    lines += ["", f"{d['clips']} held-out clips x {d['frames_per_clip']} frames at {d['resolution']} px; "
              f"extractors: {', '.join(sorted({str(v.get('extractor', v)) if isinstance(v, dict) else str(v) for v in d['extractors'].values()}))}.",
              "With 2+ seeds a cell is the mean over training seeds ± their sample SD (n - 1); with one seed, the "
              "value (IQA ± its 95% interval over clips). steps: the evaluated checkpoint's training step (the "
              "range over seeds).",
              "Wall time of these runs on this machine: training {:.2f} h, evaluation {:.2f} h; CPU time (wall x "
              "threads) {:.2f} h (a run shared with another table is counted in each).".format(
                  *(sum(s["seconds"][part] for _, s in summaries) / 3600 for part in ("train", "eval", "cpu")))]
    if partial:
        lines.append(f"Partially finished: {', '.join(partial)}.")
    if missing:
        lines.append(f"Not finished yet: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def csv_table(finished: list) -> str:
    """One line per (row, seed) with every column, IQA's interval and what the numbers depend on."""
    columns = list(evaluate.COLUMNS)
    buffer = io.StringIO()
    table = csv.writer(buffer)
    table.writerow(["Method", "seed", *columns, "IQA_ci95", "clips", "frames_per_clip", "resolution", "step"])
    for row, by_seed in finished:
        for seed, r in sorted(by_seed.items()):
            m, d = r["metrics"], r["depends_on"]
            table.writerow([row["name"], seed, *(m[c] for c in columns), m["IQA_ci95"], d["clips"],
                            d["frames_per_clip"], d["resolution"], r["step"]])
    return buffer.getvalue()


def best_scale_table(curves: dict, best_by: str, fixed: dict) -> str:
    """curves {scale: {model: [(value, summary)]}} -> Markdown: per model and swept scale, the point with
    the best mean `best_by`, with all its columns: each model at its own best scale."""
    columns, lower = list(evaluate.COLUMNS), evaluate.LOWER_IS_BETTER[best_by]
    lines = [f"### Each model at its own best scale (best mean {best_by} {'↓' if lower else '↑'} per swept scale)", "",
             *header(["Model", "swept", "best at", "other scale"], columns, ["seeds"])]
    for scale, by_model in curves.items():
        other = next(s for s in SCALE_NAMES if s != scale)
        for model, points in by_model.items():
            value, s = (min if lower else max)(points, key=lambda point: point[1][best_by]["mean"])
            lines.append(f"| {model} | {SCALE_NAMES[scale]} | {value:g} | {SCALE_NAMES[other]} = {fixed[other]:g} | "
                         + " | ".join(cell(s, c) for c in columns) + f" | {len(s['seeds'])} |")
    lines += ["", "Cells: mean over training seeds ± sample SD with 2+ seeds; with one seed, the value."]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(path: Path, scale: str, curves: dict) -> Path:
    """FVD and Sync-D against one CFG scale (the other fixed), side by side; curves {model: [(value,
    summary)]}: one line per model, the mean over seeds, error bars the SD with 2+ seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("FVD", "Sync-D")):
        for model, points in curves.items():
            sd = [np.nan if s[metric]["sd"] is None else s[metric]["sd"] for _, s in points]  # no bar: one seed
            ax.errorbar([v for v, _ in points], [s[metric]["mean"] for _, s in points], marker="o", capsize=3,
                        yerr=sd, label=model)
        ax.set_xlabel(f"{'audio' if scale == 'audio_scale' else 'reference'} CFG scale {SCALE_NAMES[scale]}")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{SCALE_NAMES[scale]} swept (mean over training seeds; bars: SD with 2+ seeds)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def plot_losses(path: Path, losses: dict) -> Path:
    """The held-out loss (`val/loss`) of each trained row against its training step, a panel per row and a
    line per seed; losses {row name: {seed: [(step, value)]}}. A line's last point is where that run stopped."""
    plt = pyplot()
    cols = min(4, len(losses))
    rows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, by_seed) in zip(axes.flat, losses.items()):
        for seed, points in sorted(by_seed.items()):
            ax.plot(*zip(*points), marker=".", markersize=3, label=f"seed {seed}")
        ax.set_yscale("log")
        ax.set_title(textwrap.fill(name, 40), fontsize=8)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(losses):]:
        ax.axis("off")
    fig.suptitle(textwrap.fill("held-out loss (val/loss) of each trained row; each line ends where its run stopped",
                               45 * cols), fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def read_clip_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """evaluate's <tag>-<key>.png, (2H, T H, 3): real frames above generated, T square frames side by side
    -> (real, generated), each (T, H, H, 3) uint8."""
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    h = image.shape[0] // 2
    return tuple(half.reshape(h, -1, h, 3).transpose(1, 0, 2, 3) for half in (image[:h], image[h:]))


def frames_png(strips: list[tuple[str, np.ndarray]]) -> bytes:
    """[(label, frames (T, H, W, 3) uint8)] -> PNG: a strip per entry of every FRAME_STRIDE-th frame side by
    side, each upscaled by nearest neighbour to >= FRAME_MIN_PX, its label in a LABEL_PX column on the left.
    Size: (LABEL_PX + widest strip) x sum(strip height + STRIP_GAP_PX) px."""
    plt = pyplot()
    images = []
    for label, frames in strips:
        up = max(1, math.ceil(FRAME_MIN_PX / min(frames.shape[1:3])))
        strip = np.concatenate(list(frames[::FRAME_STRIDE]), axis=1)  # (H, T' W, 3)
        images.append((label, strip.repeat(up, axis=0).repeat(up, axis=1)))
    width = LABEL_PX + max(image.shape[1] for _, image in images)
    height = sum(image.shape[0] + STRIP_GAP_PX for _, image in images)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    bottom = height
    for label, image in images:  # figimage draws the pixels as they are, at a pixel offset from the bottom left
        bottom -= image.shape[0] + STRIP_GAP_PX
        fig.figimage(image, xo=LABEL_PX, yo=bottom + STRIP_GAP_PX // 2, origin="upper")
        fig.text(6 / width, (bottom + STRIP_GAP_PX // 2 + image.shape[0] / 2) / height,
                 textwrap.fill(label, LABEL_CHARS), ha="left", va="center", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="fada ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, action="append", help="an ablation YAML (bundled: tables/distillers.yaml, "
                   "tables/mixed.yaml, tables/cfg.yaml, tables/cfg_sweep.yaml); several: their rows in this order, a run "
                   "folder they share once, then each table and claims.md (every claim, the total time) beside them")
    p.add_argument("--quick", action="store_true", help="two rows, seed 0, few steps, few clips (into <out>-quick)")
    p.add_argument("--row", action="append", help="run only this row (repeatable; of any --config); the rows it "
                   "needs must be trained, or run in the same --jobs call")
    p.add_argument("--seed", action="append", type=int, help="run only this training seed (repeatable; default: every "
                   "seed of each row, with --quick seed 0); the table covers every finished seed")
    p.add_argument("--collect", action="store_true", help="only write the outputs from the finished rows and seeds")
    p.add_argument("--status", action="store_true", help="only print where each row and seed is (finished, "
                   "running or stopped: its last held-out loss, waiting: for which row) and write nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process on cores / N threads "
                   "(and its own GPU if there are N); a run starts when the rows it needs are trained (default 1)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, not {args.jobs}")
    failed = []
    try:
        ablations = [Ablation(load_ablation(config), quick=args.quick, seeds=args.seed) for config in args.config]
        unknown = sorted(set(args.row or []) - {name for ablation in ablations for name in ablation.by_name})
        if unknown:
            raise ValueError(f"no row named {unknown} (rows: "
                             f"{', '.join(dict.fromkeys(n for a in ablations for n in a.by_name))})")
        queue, seen = [], set()  # every chosen row and seed of every table, in order; a shared run folder once
        for config, ablation in zip(args.config, ablations):
            for row in ablation.rows:
                for seed in ablation.seeds(row) if not args.row or row["name"] in args.row else []:
                    if (job := Job(ablation, config, row, seed)).folder not in seen:
                        seen.add(job.folder)
                        queue.append(job)
        if args.status:
            for job in queue:
                print(f"{job}: {job.ablation.status(job.row, job.seed)}")
            return []
        if not args.collect:
            if args.jobs > 1:
                for job in queue:
                    if job.ablation.result(job.row, job.seed) is not None:
                        print(f"[ablate] {job}: finished earlier, skipped")
                failed = run_jobs([job for job in queue if job.ablation.result(job.row, job.seed) is None], args.jobs)
            else:
                for job in queue:
                    job.ablation.run_row(job.row, job.seed)
        if len(ablations) > 1:
            written = collect_all(ablations, args.config)
        else:
            written = ablations[0].write_outputs()
            print(f"[ablate] wrote {', '.join(str(p) for p in written)}")
            print((ablations[0].out / "table.md").read_text())
    except (FileNotFoundError, ValueError, RunInProgress) as err:
        raise SystemExit(f"fada ablate: {err}") from None
    if failed:
        raise SystemExit(f"fada ablate: {len(failed)} run(s) did not finish: {'; '.join(failed)}")
    return written


def collect_all(ablations: list[Ablation], configs: list[str]) -> list[Path]:
    """The outputs of several tables: each table's (a table with no finished row yet is named and skipped),
    then `overview` into claims.md in the folder that holds the tables' folders."""
    written = []
    for config, ablation in zip(configs, ablations):
        try:
            written += ablation.write_outputs()
        except FileNotFoundError as err:
            print(f"[ablate] {config}: {err}")
    text = overview(ablations, configs)
    root = Path(os.path.commonpath([a.out.resolve() for a in ablations]))
    written.append(write_atomic(root / "claims.md", text.encode()))
    print(f"[ablate] wrote {', '.join(str(p) for p in written)}")
    print(text)
    return written
