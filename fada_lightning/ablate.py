"""`fada ablate`: train and evaluate every row of an ablation, then write the table (Markdown, CSV)
and, for CFG sweeps, PNG plots of FVD and Sync-D against each scale (FADA's Figures 3 and 4).

    fada ablate --config tables/distillers.yaml            # every row, in order; finished rows are skipped
    fada ablate --config tables/distillers.yaml --quick    # two rows, few steps: a first look, and CI's check
    fada ablate --config tables/mixed.yaml --row "Adaptive-0.25"   # one row (a cluster job per row) ...
    fada ablate --config tables/mixed.yaml --collect       # ... then the table from the finished rows

An ablation YAML names its rows; each row trains with `fit` (configs, as `fada fit --config`) plus
`overrides` (dotted keys), or re-evaluates another row's checkpoint (`checkpoint_of`) with other
`evaluate` arguments; `teacher: ROW` hands that row's checkpoint to a distiller, `student: ROW` starts
the student from that row's (a distiller's, for a second stage). A row's run folder is
<out>/<row slug> (or its `run`, so tables can share a teacher); it is finished when its result.json
exists, and a stopped row resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import time
from pathlib import Path

import yaml

from . import cli, evaluate
from .presets import find_config
from .video_io import write_atomic

QUICK = {"rows": 2,  # unless the YAML lists its `quick` rows
         "fit_overrides": {"trainer.max_steps": 6, "trainer.val_check_interval": 6,
                                      "data.init_args.batch_size": 2, "data.init_args.epoch_samples": 16},
         "eval_overrides": {"clips": 4, "frames": 16, "batch_size": 4, "videos": 1}}
SCALE_NAMES = {"audio_scale": "s_a", "ref_scale": "s_r"}
ROW_KEYS = {"name", "fit", "overrides", "run", "teacher", "student", "reference", "checkpoint_of", "evaluate", "sweep"}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_")


def load_ablation(path: str | Path) -> dict:
    """The ablation YAML, with its CFG sweeps expanded into evaluate-only rows; checked for clear errors."""
    path = find_config(path)
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list) or not spec["rows"]:
        raise ValueError(f"{path}: an ablation needs a non-empty list `rows`")
    spec.setdefault("name", Path(path).stem)
    spec.setdefault("out", f"runs/ablation/{spec['name']}")
    spec.setdefault("evaluation", ["eval/synthetic.yaml"])
    rows = [dict(row) for row in spec["rows"]]
    sweep = spec.get("sweep")
    if sweep:  # {model: ROW, fixed: {ref_scale, audio_scale}, audio_scale: [...], ref_scale: [...]}
        for scale in ("audio_scale", "ref_scale"):
            for value in sweep.get(scale, []):
                scales = {**sweep["fixed"], scale: float(value)}
                rows.append({"name": f"{sweep['model']} {SCALE_NAMES[scale]}={value:g}", "checkpoint_of": sweep["model"],
                             "evaluate": scales, "sweep": scale})
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
        for key in ("teacher", "student", "checkpoint_of"):
            if key in row and row[key] not in names[:i]:
                raise ValueError(f"{path}: row {row['name']!r}: {key} {row[key]!r} is not a row above it "
                                 f"(rows: {', '.join(names[:i]) or 'none'})")
        for config in row.get("fit", []):
            find_config(config)  # a missing config fails here, before any training
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names repeat: {names}")
    spec.setdefault("quick", names[:QUICK["rows"]])  # the rows --quick runs: a teacher and a student, say
    unknown = [name for name in spec["quick"] if name not in names]
    if unknown:
        raise ValueError(f"{path}: quick names rows that do not exist: {unknown}")
    spec["rows"] = rows
    return spec


class Ablation:
    """Runs the rows of one ablation spec; `quick` uses QUICK's rows, steps and clips, in <out>-quick."""

    def __init__(self, spec: dict, quick: bool = False, progress: bool = True):
        self.spec, self.quick, self.progress = spec, quick, progress
        self.out = Path(spec["out"] + ("-quick" if quick else ""))
        self.by_name = {row["name"]: row for row in spec["rows"]}
        self.rows = [self.by_name[name] for name in spec["quick"]] if quick else spec["rows"]

    def run_dir(self, row: dict) -> Path:
        if "checkpoint_of" in row:
            return self.out / slug(row["name"])
        return Path(row["run"] + ("-quick" if self.quick else "")) if "run" in row else self.out / slug(row["name"])

    def checkpoint(self, row: dict) -> Path:
        if "checkpoint_of" in row:
            return self.checkpoint(self.by_name[row["checkpoint_of"]])
        return self.run_dir(row) / "tb" / "run" / "checkpoints" / "last.ckpt"

    def result(self, row: dict) -> dict | None:
        path = self.run_dir(row) / "result.json"
        return json.loads(path.read_text()) if path.exists() else None

    # ---- one row ---------------------------------------------------------------------------------
    def run_row(self, row: dict) -> dict:
        done = self.result(row)
        if done is not None:
            print(f"[ablate] {row['name']}: finished earlier ({self.run_dir(row) / 'result.json'}), skipped")
            return done
        began = time.perf_counter()
        if "fit" in row:
            self.train(row)
        elif not self.checkpoint(row).exists():
            raise FileNotFoundError(f"row {row['name']!r} evaluates {row['checkpoint_of']!r}'s checkpoint "
                                    f"{self.checkpoint(row)}, which is not trained yet: run that row first")
        result = self.evaluate(row)
        result["row"], result["seconds_row"] = row["name"], round(time.perf_counter() - began, 1)
        write_atomic(self.run_dir(row) / "result.json", json.dumps(result, indent=1).encode())
        print(f"[ablate] {row['name']}: {evaluate.format_metrics(result)}")
        return result

    def train(self, row: dict) -> None:
        """`fada fit` into the row's folder, resuming from its last checkpoint if a run was stopped."""
        root, ckpt = self.run_dir(row), self.checkpoint(row)
        if (root / "trained").exists():
            return
        for key, verb in (("teacher", "distils"), ("student", "starts from")):
            if key in row and not self.checkpoint(self.by_name[row[key]]).exists():
                raise FileNotFoundError(f"row {row['name']!r} {verb} {row[key]!r}, whose checkpoint "
                                        f"{self.checkpoint(self.by_name[row[key]])} does not exist yet: run that row first")
        args = self.fit_args(row)
        if ckpt.exists():
            print(f"[ablate] {row['name']}: resuming from {ckpt}")
            args.append(f"--ckpt_path={ckpt}")
        print(f"[ablate] {row['name']}: fada {' '.join(args)}")
        cli.main(args)
        if not ckpt.exists():
            raise RuntimeError(f"row {row['name']!r}: training ended without {ckpt} (does its config keep a "
                               f"last checkpoint? the row needs FinalCheckpoint with save_last)")
        (root / "trained").touch()

    def fit_args(self, row: dict) -> list[str]:
        """The `fada fit` command line of a training row: its configs, overrides, teacher and run folder."""
        root = self.run_dir(row)
        args = ["fit"]
        for config in row["fit"]:
            args += ["--config", config]
        overrides = {**row.get("overrides", {}), **(QUICK["fit_overrides"] if self.quick else {})}
        for key in ("teacher", "student"):
            if key in row:
                overrides[f"model.init_args.{key}_ckpt"] = str(self.checkpoint(self.by_name[row[key]]))
        overrides.update({"trainer.default_root_dir": str(root), "trainer.logger.init_args.save_dir": str(root),
                          "trainer.logger.init_args.name": "tb", "trainer.logger.init_args.version": "run"})
        return args + [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}"
                       for key, value in overrides.items()]

    def evaluate(self, row: dict) -> dict:
        args = ["--ckpt", str(self.checkpoint(row)), "--out", str(self.run_dir(row) / "eval" / "result.json")]
        for config in self.spec["evaluation"] if isinstance(self.spec["evaluation"], list) else [self.spec["evaluation"]]:
            args += ["--config", config]
        settings = {**self.spec.get("eval_overrides", {}), **row.get("evaluate", {}),
                    **(QUICK["eval_overrides"] if self.quick else {})}
        args += [f"--{key}={json.dumps(value)}" for key, value in settings.items()]
        return evaluate.run(args, progress=self.progress)

    # ---- the table -------------------------------------------------------------------------------
    def write_outputs(self) -> list[Path]:
        """table.md, table.csv and (with a sweep) one PNG per swept scale, from the finished rows."""
        results = [(row, self.result(row)) for row in self.rows]
        finished = [(row, r) for row, r in results if r is not None]
        missing = [row["name"] for row, r in results if r is None]
        if not finished:
            raise FileNotFoundError(f"no finished rows under {self.out} yet")
        columns = list(evaluate.COLUMNS)
        written = [self.out / "table.md", self.out / "table.csv"]
        write_atomic(written[0], markdown_table(self.spec.get("title", self.spec["name"]), columns, finished, missing,
                                                self.quick).encode())
        buffer = io.StringIO()
        table = csv.writer(buffer)
        table.writerow(["Method", *columns, "IQA_ci95", "clips", "frames_per_clip", "resolution", "step"])
        for row, r in finished:
            m, d = r["metrics"], r["depends_on"]
            table.writerow([row["name"], *(m[c] for c in columns), m["IQA_ci95"], d["clips"], d["frames_per_clip"],
                            d["resolution"], r["step"]])
        write_atomic(written[1], buffer.getvalue().encode())
        for scale in ("audio_scale", "ref_scale"):
            points = [(r["depends_on"]["sampler"][scale], r["metrics"]) for row, r in finished if row.get("sweep") == scale]
            if points:
                written.append(plot_sweep(self.out / f"sweep_{scale}.png", scale, sorted(points, key=lambda p: p[0]),
                                          self.spec["sweep"]["model"]))
        return written


def markdown_table(title: str, columns: list[str], finished: list, missing: list[str], quick: bool) -> str:
    """Rows in the ablation's order, FADA's column order (Sync-C added); the best of each column in bold."""
    best = {}
    for c in columns[1:]:
        values = [r["metrics"][c] for row, r in finished if not row.get("reference")]
        if values:
            best[c] = min(values) if evaluate.LOWER_IS_BETTER[c] else max(values)
    arrows = {c: "↓" if evaluate.LOWER_IS_BETTER[c] else "↑" for c in columns}
    lines = [f"### {title}" + (" (quick profile: a smoke test, not a result)" if quick else ""), "",
             "| Method | " + " | ".join(f"{c} {arrows[c]}" for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row, r in finished:
        cells = []
        for c in columns:
            v = r["metrics"][c]
            text = f"{v:g}" if c == "NFE-D" else f"{v:.4g}" + (f" ± {r['metrics']['IQA_ci95']:.2g}" if c == "IQA" else "")
            cells.append(f"**{text}**" if best.get(c) == v and c != "NFE-D" else text)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    d = finished[0][1]["depends_on"]
    lines += ["", f"{d['clips']} held-out clips x {d['frames_per_clip']} frames at {d['resolution']} px; "
              f"extractors: {', '.join(sorted({str(v.get('extractor', v)) if isinstance(v, dict) else str(v) for v in d['extractors'].values()}))}."]
    if missing:
        lines.append(f"Not finished yet: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def plot_sweep(path: Path, scale: str, points: list, model: str) -> Path:
    """FVD and Sync-D against one CFG scale (the other fixed), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p[0] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric in zip(axes, ("FVD", "Sync-D")):
        ax.plot(x, [p[1][metric] for p in points], marker="o")
        ax.set_xlabel(f"{'audio' if scale == 'audio_scale' else 'reference'} CFG scale {SCALE_NAMES[scale]}")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{model}: {SCALE_NAMES[scale]} swept")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="fada ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="an ablation YAML (bundled: tables/distillers.yaml, "
                   "tables/mixed.yaml, tables/cfg.yaml, tables/cfg_sweep.yaml)")
    p.add_argument("--quick", action="store_true", help="two rows, few steps, few clips (into <out>-quick)")
    p.add_argument("--row", action="append", help="run only this row (repeatable); its dependencies must be finished")
    p.add_argument("--collect", action="store_true", help="only write the table from the finished rows")
    args = p.parse_args(argv)
    try:
        ablation = Ablation(load_ablation(args.config), quick=args.quick)
        if not args.collect:
            unknown = sorted(set(args.row or []) - set(ablation.by_name))
            if unknown:
                raise ValueError(f"no row named {unknown} (rows: {', '.join(ablation.by_name)})")
            for row in ablation.rows:
                if not args.row or row["name"] in args.row:
                    ablation.run_row(row)
        written = ablation.write_outputs()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"fada ablate: {err}") from None
    print(f"[ablate] wrote {', '.join(str(p) for p in written)}")
    print((ablation.out / "table.md").read_text())
    return written
