"""`fada ablate` and `fada evaluate`: every ablation YAML loads and its rows resolve as `fada fit` configs
(seed included), bad specs are clear errors, seeds aggregate to mean ± SD, sweeps expand per model, NFE-D is
counted, and a quick ablation runs end to end at two seeds and resumes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fada_lightning import ablate, evaluate
from fada_lightning.cli import main as fada
from fada_lightning.presets import bundled_config_dir

ABLATION_SPECS = sorted(p.name for p in (bundled_config_dir() / "tables").glob("*.yaml"))


def test_the_issue_s_ablations_are_bundled():
    assert ABLATION_SPECS == ["cfg.yaml", "cfg_sweep.yaml", "distillers.yaml", "mixed.yaml"]


@pytest.mark.parametrize("name", ABLATION_SPECS)
def test_every_ablation_yaml_loads_and_each_row_resolves_as_a_fit_config(name, capsys):
    spec = ablate.load_ablation(f"tables/{name}")
    ablation = ablate.Ablation(spec)
    for row in spec["rows"]:
        if "fit" not in row:
            assert row["checkpoint_of"] in {r["name"] for r in spec["rows"]}
            continue
        seed = row["seeds"] - 1  # the last seed: 0 is every default
        with pytest.raises(SystemExit) as done:  # the very command line `fada ablate` runs, printed instead
            fada([*ablation.fit_args(row, seed), "--print_config"])
        assert done.value.code in (0, None), row["name"]
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(ablation.run_dir(row, seed))
        assert ablation.run_dir(row, seed).name == f"seed{seed}"
        assert (printed["seed_everything"], printed["data"]["init_args"]["seed"]) == (seed, seed), row["name"]
        if "teacher" in row:  # seed s distils the teacher's seed s
            assert printed["model"]["init_args"]["teacher_ckpt"] == str(ablation.checkpoint(
                ablation.by_name[row["teacher"]], seed))
            assert f"/seed{seed}/" in printed["model"]["init_args"]["teacher_ckpt"]
        plateau = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith(".Plateau")]
        assert len(plateau) == ("budgets/plateau.yaml" in row["fit"]), row["name"]  # the students' budget rule
        for key, value in row.get("overrides", {}).items():  # each override lands where its dotted key says
            found = printed
            for part in key.split("."):
                found = found[part]
            assert found == value, (row["name"], key, found)


def test_the_sweep_expands_into_evaluation_rows_of_each_model():
    spec = ablate.load_ablation("tables/cfg_sweep.yaml")
    models = ["Teacher A", "FADA-Fast", "CFG time embed", "CFG layer", "FADA-Fast wide s_r"]
    assert spec["sweep"]["models"] == models and spec["sweep"]["best_by"] == "FVD"
    seeds = {row["name"]: row["seeds"] for row in spec["rows"] if row["name"] in models}
    assert seeds == {**dict.fromkeys(models, 2), "FADA-Fast wide s_r": 1}  # the diagnostic row: one seed
    sweep = [row for row in spec["rows"] if "sweep" in row]
    assert [row["checkpoint_of"] for row in sweep] == [m for m in models for _ in range(7 + 5)]
    for model in models:
        points = [r for r in sweep if r["checkpoint_of"] == model]
        assert {(r["evaluate"]["ref_scale"], r["evaluate"]["audio_scale"]) for r in points if r["sweep"] == "ref_scale"} \
            == {(s, 6.5) for s in (1.0, 1.5, 2.0, 2.5, 3.0)}
        assert f"{model} s_a=6.5" in [r["name"] for r in points] and all(r["seeds"] == seeds[model] for r in points)
    # a teacher's sweep points are references (out of the bold), the students' are not
    assert {r["checkpoint_of"] for r in sweep if r.get("reference")} == {"Teacher A"}
    # its models are its own: trained in its folder, so it needs no other table's checkpoints
    ablation, others = ablate.Ablation(spec), [ablate.load_ablation(f"tables/{name}.yaml") for name in ("cfg", "distillers", "mixed")]
    folders = {ablate.Ablation(other).run_dir(row, 0) for other in others for row in other["rows"]}
    for model in models:
        assert ablation.run_dir(ablation.by_name[model], 0) == Path("runs/ablation/cfg_sweep") / ablate.slug(model) / "seed0"
        assert ablation.run_dir(ablation.by_name[model], 0) not in folders


def test_a_one_model_sweep_keeps_its_short_form(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"rows": [{"name": "t", "fit": ["teacher.yaml"], "seeds": 3}],
                                    "sweep": {"model": "t", "fixed": {"ref_scale": 2.0, "audio_scale": 6.5},
                                              "ref_scale": [1.0, 3.0], "best_by": "Sync-C"}}))
    spec = ablate.load_ablation(path)
    assert [(r["name"], r["seeds"]) for r in spec["rows"][1:]] == [("t s_r=1", 3), ("t s_r=3", 3)]
    assert spec["sweep"]["models"] == ["t"]


@pytest.mark.parametrize("rows, message", [
    ([{"name": "a", "fit": ["teacher.yaml"], "checkpoint_of": "a"}], "exactly one of"),
    ([{"name": "s", "fit": ["distill_perflow.yaml"], "teacher": "t"}], "is not a row above it"),
    ([{"name": "t", "fit": ["teacher.yaml"]}, {"name": "s", "fit": ["distill_turbo.yaml"], "teacher": "t", "student": "d"}],
     "student .d. is not a row above it"),
    ([{"name": "a", "fit": ["teacher.yaml"]}, {"name": "a", "fit": ["teacher.yaml"]}], "repeat"),
    ([{"name": "a", "fit": ["no_such_config.yaml"]}], "no_such_config"),
    ([{"name": "A + B", "Fixed-0": None, "fit": ["teacher.yaml"]}], r"unknown keys \['Fixed-0'\]"),
    # seed s of a row uses seed s of what it depends on: both rows and both counts named
    ([{"name": "t", "fit": ["teacher.yaml"], "seeds": 1}, {"name": "s", "fit": ["distill_perflow.yaml"], "teacher": "t",
                                                           "seeds": 2}],
     r"row 's' runs 2 seeds but its teacher 't' only 1"),
    ([{"name": "t", "fit": ["teacher.yaml"], "seeds": 2}, {"name": "e", "checkpoint_of": "t", "seeds": 3}],
     r"row 'e' runs 3 seeds but its checkpoint_of 't' only 2"),
    ([{"name": "t", "fit": ["teacher.yaml"], "seeds": 0}], r"row 't': seeds must be a whole number >= 1"),
])
def test_a_bad_ablation_is_one_clear_error(tmp_path, rows, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"rows": rows}))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ablate.load_ablation(path)


@pytest.mark.parametrize("spec, message", [
    ({"seeds": 2, "rows": [{"name": "t", "fit": ["teacher.yaml"], "seeds": 1},
                           {"name": "s", "fit": ["distill_perflow.yaml"], "teacher": "t"}]},
     r"row 's' runs 2 seeds but its teacher 't' only 1.*give 't' seeds: 2 or 's' seeds: 1"),
    ({"seeds": "two", "rows": [{"name": "t", "fit": ["teacher.yaml"]}]}, r"top-level: seeds must be"),
    ({"rows": [{"name": "t", "fit": ["teacher.yaml"]}], "sweep": {"model": "t", "models": ["t"]}}, "exactly one of"),
    ({"rows": [{"name": "t", "fit": ["teacher.yaml"]}],
      "sweep": {"models": ["t"], "fixed": {"ref_scale": 2.0, "audio_scale": 6.5}, "best_by": "PSNR"}}, "best_by 'PSNR'"),
    ({"rows": [{"name": "t", "fit": ["teacher.yaml"]}],
      "sweep": {"models": ["u"], "fixed": {"ref_scale": 2.0, "audio_scale": 6.5}, "ref_scale": [1.0]}},
     r"row 'u s_r=1': checkpoint_of 'u' is not a row above it"),
    ({"rows": [{"name": "t", "fit": ["teacher.yaml"]}], "claims": [{"claim": "t wins", "better": "t", "than": "u"}]},
     r"claim 't wins': than 'u' is not a row \(rows: t\)"),
    ({"rows": [{"name": "t", "fit": ["teacher.yaml"]}], "claims": [{"claim": "c", "better": "t", "than": "t",
                                                                   "columns": ["NFE-D"]}]}, r"claim 'c': columns \['NFE-D'\]"),
    ({"rows": [{"name": "t", "fit": ["teacher.yaml"]}], "claims": [{"better": "t", "than": "t"}]},
     r"a claim is \{claim: TEXT, better: ROW, than: ROW"),
])
def test_a_bad_seed_count_sweep_or_claim_is_one_clear_error(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=message):
        ablate.load_ablation(path)


def result(seed: int, fvd: float, iqa: float = 0.5) -> dict:
    metrics = {"NFE-D": 6, "IQA": iqa, "IQA_ci95": 0.1, "Sync-D": 8.0 + seed, "Sync-C": 1.0, "FVD": fvd,
               "FID": 10.0, "E-FID": 1.0}
    return {"metrics": metrics, "seed": seed, "step": 100 + seed, "seconds_train": 60.0, "seconds_eval": 30.0}


def test_seeds_aggregate_to_mean_sample_sd_min_and_max():
    summary = ablate.summarize({2: {**result(2, 5.0), "threads": 1}, 0: result(0, 1.0), 1: result(1, 3.0)})
    assert summary["seeds"] == [0, 1, 2]
    assert summary["FVD"] == {"mean": 3.0, "sd": 2.0, "min": 1.0, "max": 5.0, "values": [1.0, 3.0, 5.0]}  # ddof 1
    assert summary["Sync-D"]["values"] == [8.0, 9.0, 10.0] and summary["Sync-D"]["sd"] == 1.0
    assert summary["NFE-D"] == {"mean": 6.0, "sd": 0.0, "min": 6.0, "max": 6.0, "values": [6.0] * 3}
    assert set(summary) == {"seeds", "steps", "seconds", *evaluate.COLUMNS, "IQA_ci95"}
    # CPU time: 90 s on 1 thread, and twice 90 s on torch's default (every core) where threads were not recorded
    assert summary["steps"] == [100, 101, 102] and summary["seconds"] == {"train": 180.0, "eval": 90.0,
                                                                         "cpu": 90.0 + 2 * 90.0 * os.cpu_count()}
    assert ablate.steps_cell(summary) == "100-102"
    one = ablate.summarize({0: result(0, 4.0)})
    assert one["seeds"] == [0] and one["FVD"] == {"mean": 4.0, "sd": None, "min": 4.0, "max": 4.0, "values": [4.0]}
    assert ablate.cell(one, "IQA") == "0.5 ± 0.1" and ablate.cell(one, "FVD") == "4"  # one seed: IQA's interval
    assert ablate.steps_cell(one) == "100"
    assert ablate.cell(summary, "FVD") == "3 ± 2" and ablate.cell(summary, "NFE-D") == "6"


@pytest.mark.parametrize("better, than, lower, verdict", [
    ([0.7, 0.8, 0.75], [0.6, 0.65, 0.69], False, ablate.HOLDS),  # every seed above every other seed
    ([0.7, 0.8, 0.75], [0.6, 0.65, 0.71], False, ablate.UNDECIDED),  # the ranges overlap
    ([0.6, 0.65, 0.69], [0.7, 0.8, 0.75], False, ablate.FAILS),
    ([1.0, 1.2], [1.5, 1.3], True, ablate.HOLDS),  # lower is better (FVD)
    ([1.5, 1.3], [1.0, 1.2], True, ablate.FAILS),
    ([1.0], [2.0, 2.1], True, ablate.UNDECIDED),  # one seed: no spread measured
])
def test_a_claim_holds_only_beyond_the_spread_over_training_seeds(better, than, lower, verdict):
    assert ablate.judge(better, than, lower) == verdict


def test_the_claims_table_judges_each_column_and_the_claim():
    a = ablate.summarize({s: result(s, fvd, iqa) for s, (fvd, iqa) in enumerate([(1.0, 0.6), (1.1, 0.5), (1.2, 0.4)])})
    b = ablate.summarize({s: result(s, fvd, iqa) for s, (fvd, iqa) in enumerate([(2.0, 0.7), (2.1, 0.8), (2.2, 0.9)])})
    claims = [{"claim": "A beats B", "better": "A", "than": "B", "columns": ["FVD", "IQA", "Sync-D"]},
              {"claim": "A beats B on FVD", "better": "A", "than": "B", "columns": ["FVD"]},
              {"claim": "B beats A on IQA", "better": "B", "than": "A", "columns": ["IQA"]},
              {"claim": "C beats A", "better": "C", "than": "A", "columns": ["FVD"]}]
    lines = ablate.claims_table(claims, {"A": a, "B": b}).splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    columns = dict(zip(ablate.QUALITY, rows["A beats B"]))
    assert (columns["FVD"], columns["IQA"], columns["Sync-D"]) == (ablate.HOLDS, ablate.FAILS, ablate.UNDECIDED)
    assert columns["FID"] == "" and rows["A beats B"][-1] == "in part |"  # Sync-D: the same per seed in both
    assert rows["A beats B on FVD"][-1] == "holds |" and rows["B beats A on IQA"][-1] == "holds |"
    assert rows["C beats A"][-1] == "not judged: C not finished |"


def test_each_model_s_best_scale_is_its_own_best_mean(tmp_path):
    def point(*fvds):  # one sweep point over seeds; IQA = FVD, so the best IQA is the worst FVD
        return ablate.summarize({s: result(s, fvd, iqa=fvd) for s, fvd in enumerate(fvds)})

    def row(model, value):
        return {"name": f"{model} s_a={value:g}", "checkpoint_of": model, "sweep": "audio_scale",
                "evaluate": {"ref_scale": 2.0, "audio_scale": value}}

    summaries = [(row("A", 6.5), point(6, 6)), (row("A", 1.0), point(9, 7)), (row("A", 4.0), point(3, 5)),
                 ({"name": "A", "fit": []}, point(1, 1)), (row("B", 4.0), point(4, 4)), (row("B", 1.0), point(2, 2))]
    curves = ablate.sweep_curves(summaries)  # per scale and model, in scale order; non-sweep rows left out
    assert {scale: {m: [v for v, _ in points] for m, points in by_model.items()} for scale, by_model in curves.items()} \
        == {"audio_scale": {"A": [1.0, 4.0, 6.5], "B": [1.0, 4.0]}}
    fixed = {"ref_scale": 2.0, "audio_scale": 6.5}
    lines = ablate.best_scale_table(curves, "FVD", fixed).splitlines()
    assert "| A | s_a | 4 | s_r = 2 |" in "\n".join(lines) and "| B | s_a | 1 | s_r = 2 |" in "\n".join(lines)
    higher = "\n".join(ablate.best_scale_table(curves, "IQA", fixed).splitlines())  # IQA: higher is better
    assert "| A | s_a | 1 |" in higher and "| B | s_a | 4 |" in higher
    path = ablate.plot_sweep(tmp_path / "sweep.png", "audio_scale", curves["audio_scale"])  # two lines, SD bars
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_job_at_one_seed_tabulates_every_finished_seed(tmp_path):
    spec = {"name": "t", "out": str(tmp_path / "t"), "seeds": 3, "claims": [],
            "rows": [{"name": "A", "fit": ["teacher.yaml"], "seeds": 3}, {"name": "B", "fit": ["teacher.yaml"], "seeds": 3}]}
    depends_on = {"clips": 4, "frames_per_clip": 16, "resolution": 32, "extractors": {"iqa": "x"}}
    for name, seed, fvd in [("A", 0, 1.0), ("A", 1, 3.0), ("B", 2, 2.0)]:
        folder = tmp_path / "t" / name / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({**result(seed, fvd), "depends_on": depends_on}))
    ablate.Ablation(spec, seeds=[1]).write_outputs()  # what `--row A --seed 1` writes once A's seed 1 is done
    table = (tmp_path / "t" / "table.md").read_text()
    line = next(line for line in table.splitlines() if line.startswith("| A |"))
    assert "2 ± 1.4" in line and line.endswith(" | 100-101 | 2 |")  # FVD over seeds 0 and 1
    assert "Partially finished: A (2 of 3 seeds), B (1 of 3 seeds)." in table
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["B"]["seeds"] == [2]


def test_collecting_several_tables_judges_every_claim_and_counts_a_shared_run_once(tmp_path, capsys):
    shared = {"name": "T", "fit": ["teacher.yaml"], "run": str(tmp_path / "shared_teacher")}  # in both tables
    tables = {"one": [shared, {"name": "A", "fit": ["teacher.yaml"]}], "two": [shared, {"name": "B", "fit": ["teacher.yaml"]}],
              "empty": [{"name": "C", "fit": ["teacher.yaml"]}]}
    claims = {"one": [{"claim": "A beats T", "better": "A", "than": "T", "columns": ["FVD", "IQA"]}],
              "two": [{"claim": "B beats T", "better": "B", "than": "T"}], "empty": []}
    configs = []
    for name, rows in tables.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "title": f"Table {name}: some rows", "out": str(tmp_path / "tables" / name),
                                        "seeds": 2, "rows": rows, "claims": claims[name]}))
        configs += ["--config", str(path)]
    depends_on = {"clips": 4, "frames_per_clip": 16, "resolution": 32, "extractors": {"iqa": "x"}}
    # A: lower FVD (holds) and lower IQA (does not hold) than T at both seeds; B at one seed only
    for folder, seed, fvd, iqa in [("shared_teacher", 0, 2.0, 0.6), ("shared_teacher", 1, 2.2, 0.7),
                                   ("tables/one/A", 0, 1.0, 0.4), ("tables/one/A", 1, 1.1, 0.5), ("tables/two/B", 0, 1.0, 0.9)]:
        (tmp_path / folder / f"seed{seed}").mkdir(parents=True)
        (tmp_path / folder / f"seed{seed}" / "result.json").write_text(
            json.dumps({**result(seed, fvd, iqa), "threads": 1, "depends_on": depends_on}))
    written = ablate.main(["--collect", *configs])
    assert written[-1] == tmp_path / "tables" / "claims.md" and (tmp_path / "tables" / "one" / "table.md").exists()
    text = written[-1].read_text()
    assert "| Table one | A beats T | in part | FVD | IQA |" in text  # the title up to a colon
    assert "| Table two | B beats T | cannot tell |  |  |" in text  # one seed of B: no spread
    assert "`fada ablate --collect --config " in text
    assert "5 finished runs" in text and "training 0.08 h, evaluation 0.04 h wall" in text  # T's 2 runs once
    assert "no finished rows under" in capsys.readouterr().out  # the empty table is named, not an error


def test_a_sweep_s_fixed_point_is_evaluated_once_for_both_figures(tmp_path, monkeypatch):
    spec = yaml.safe_load((bundled_config_dir() / "tables" / "cfg_sweep.yaml").read_text())
    spec["out"], spec["record"] = str(tmp_path / "sweep"), None  # its models' run folders are the repo's
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    by_audio, by_ref = ablation.by_name["FADA-Fast s_a=6.5"], ablation.by_name["FADA-Fast s_r=2"]
    assert by_audio["evaluate"] == by_ref["evaluate"] == {"ref_scale": 2.0, "audio_scale": 6.5}
    done = {**result(1, 3.0), "row": by_audio["name"], "seconds_eval": 64.0, "threads": 1,
            "ground_truth": {"IQA": 0.9, "Sync-D": 0.08, "Sync-C": 0.47},
            "depends_on": {"clips": 4, "frames_per_clip": 16, "resolution": 32}}
    (ablation.run_dir(by_audio, 1)).mkdir(parents=True)
    (ablation.run_dir(by_audio, 1) / "result.json").write_text(json.dumps(done))
    monkeypatch.setattr(ablate.Ablation, "evaluate", lambda *args: pytest.fail("evaluated the same point again"))
    copy = ablation.run_row(by_ref, 1)
    assert copy["metrics"] == done["metrics"] and copy["same_as"] == by_audio["name"] and copy["seconds_eval"] == 0
    assert ablation.result(by_ref, 1) == copy and ablation.twin(by_ref, 0) is None  # seed 0 is not finished
    assert ablation.twin(ablation.by_name["FADA-Fast s_a=4"], 1) is None  # another point: evaluated on its own


def test_a_sweep_point_at_its_model_s_own_scales_copies_the_model_s_evaluation(tmp_path, monkeypatch):
    spec = yaml.safe_load((bundled_config_dir() / "tables" / "cfg_sweep.yaml").read_text())
    spec["out"], spec["record"] = str(tmp_path / "sweep"), None
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    teacher = ablation.by_name["Teacher A"]  # evaluated at its own defaults, s_r 2.5 and s_a 6.5
    done = {**result(0, 3.0), "row": "Teacher A", "seconds_train": 9000.0, "seconds_eval": 800.0, "threads": 1,
            "checkpoint_sha256": "abc", "ground_truth": {"IQA": 0.9, "Sync-D": 0.08, "Sync-C": 0.47},
            "depends_on": {"clips": 4, "frames_per_clip": 16, "resolution": 32,
                           "sampler": {"steps": 25, "ref_scale": 2.5, "audio_scale": 6.5}}}
    ablation.run_dir(teacher, 0).mkdir(parents=True)
    (ablation.run_dir(teacher, 0) / "result.json").write_text(json.dumps(done))
    same, other = ablation.by_name["Teacher A s_r=2.5"], ablation.by_name["Teacher A s_a=6.5"]
    assert teacher in ablation.twins(same) and teacher in ablation.twins(other)  # either may match: waits for it
    assert ablation.twin(other, 0) is None and ablation.twin(same, 1) is None  # s_r 2, not 2.5; seed 1 not finished
    monkeypatch.setattr(ablate.Ablation, "evaluate", lambda *args: pytest.fail("evaluated the model's scales again"))
    copy = ablation.run_row(same, 0)
    assert copy["metrics"] == done["metrics"] and copy["same_as"] == "Teacher A"
    assert copy["built_on"] == {"Teacher A": "abc"}
    assert copy["seconds_train"] == copy["seconds_eval"] == 0  # the teacher's time is counted once, on its own row
    assert ablation.twins(teacher) == []  # a trained row is evaluated itself (and its training time counted)


def test_a_row_s_model_is_its_best_checkpoint_where_kept_and_a_run_resumes_from_its_last(tmp_path):
    ablation = ablate.Ablation(ablate.load_ablation("tables/distillers.yaml"))
    row = {**ablation.by_name["TCD"], "run": str(tmp_path / "tcd")}
    ablation.by_name["TCD"] = row
    checkpoints = ablation.tensorboard(row, 1) / "checkpoints"
    assert ablation.checkpoint(row, 1) == ablation.last_checkpoint(row, 1) == checkpoints / "last.ckpt"
    checkpoints.mkdir(parents=True)
    (checkpoints / "best.ckpt").touch()  # budgets/plateau.yaml's: the lowest val/loss
    assert ablation.checkpoint(row, 1) == checkpoints / "best.ckpt"
    assert ablation.last_checkpoint(row, 1) == checkpoints / "last.ckpt"
    assert ablation.checkpoint({"name": "TCD at 1 step", "checkpoint_of": "TCD"}, 1) == checkpoints / "best.ckpt"


def test_a_run_resumed_on_another_thread_count_is_warned_of_and_each_start_s_threads_are_kept(tmp_path, monkeypatch,
                                                                                             capsys):
    ablation = ablate.Ablation(ablate.load_ablation("tables/distillers.yaml"))
    row = ablation.by_name["Teacher A (strict)"] = {**ablation.by_name["Teacher A (strict)"], "run": str(tmp_path / "t")}

    def fit(args):  # a training killed once it has written last.ckpt
        ablation.last_checkpoint(row, 0).parent.mkdir(parents=True, exist_ok=True)
        ablation.last_checkpoint(row, 0).touch()
        raise SystemExit("killed")

    monkeypatch.setattr(ablate.cli, "main", fit)
    for threads in (2, 2, 1):
        monkeypatch.setattr(ablate.torch, "get_num_threads", lambda count=threads: count)
        with pytest.raises(SystemExit):
            ablation.train(row, 0)
    assert ablation.train_threads(row, 0) == [2, 2, 1]
    out = capsys.readouterr().out
    assert out.count("warning: resuming on") == 1  # the second start's count is the first's
    assert "resuming on 1 threads where it began on 2: the model will differ" in out and "OMP_NUM_THREADS=2" in out
    shutil.rmtree(ablation.last_checkpoint(row, 0).parent)  # killed before its first checkpoint: starts anew
    with pytest.raises(SystemExit):
        ablation.train(row, 0)
    assert ablation.train_threads(row, 0) == [1]


def test_a_row_waits_for_its_dependency_s_training_to_finish_not_for_its_first_checkpoint(tmp_path):
    spec = ablate.load_ablation("tables/distillers.yaml")
    spec["out"] = str(tmp_path)
    for row in spec["rows"]:
        row.pop("run", None)  # every run folder under tmp_path
    ablation = ablate.Ablation(spec)
    teacher, dmd = ablation.by_name["Teacher A (strict)"], ablation.by_name["DMD (4 NFE)"]
    for row in (teacher, dmd):  # runs in progress (another job's): checkpoints written, training not over
        ablation.last_checkpoint(row, 0).parent.mkdir(parents=True)
        ablation.last_checkpoint(row, 0).touch()
    with pytest.raises(FileNotFoundError, match=r"needs 'Teacher A \(strict\)', whose training .* has not finished"):
        ablation.run_row(ablation.by_name["TCD"], 0)
    with pytest.raises(FileNotFoundError, match=r"evaluates the checkpoint of 'DMD \(4 NFE\)' .* not trained yet"):
        ablation.run_row(ablation.by_name["DMD (4 NFE) at 1 step"], 0)
    (ablation.run_dir(dmd, 0) / "trained").touch()
    assert ablation.trained(ablation.by_name["DMD (4 NFE) at 1 step"], 0) and not ablation.trained(teacher, 0)


def test_status_tells_where_each_row_and_seed_is(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    rows = [{"name": "T", "fit": ["teacher.yaml"]}, {"name": "S", "fit": ["distill_tcd.yaml"], "teacher": "T"},
            {"name": "S at 1 step", "checkpoint_of": "S", "evaluate": {"steps": 1}}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "t"), "seeds": 3, "rows": rows}))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    teacher, student = ablation.by_name["T"], ablation.by_name["S"]
    for seed in (0, 1):
        ablation.run_dir(teacher, seed).mkdir(parents=True)
        (ablation.run_dir(teacher, seed) / "trained").touch()
    (ablation.run_dir(teacher, 0) / "result.json").write_text(json.dumps(result(0, 1.0)))
    ablation.last_checkpoint(teacher, 2).parent.mkdir(parents=True)
    ablation.last_checkpoint(teacher, 2).touch()
    with SummaryWriter(str(ablation.tensorboard(teacher, 2))) as writer:
        for step, value in ((499, 0.02), (999, 0.01), (1499, 0.012)):
            writer.add_scalar("val/loss", value, step)
    ablation.run_dir(student, 1).mkdir(parents=True)
    (ablation.run_dir(student, 1) / "trained").touch()
    ablate.main(["--config", str(path), "--status"])
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["T (seed 0): finished", "T (seed 1): trained, not evaluated",
                       "T (seed 2): stopped (resumes from last.ckpt): val/loss 0.012 after 1500 steps, best 0.01 "
                       "after 1000 (last.ckpt written 0 min ago)"]
    assert out[3:] == ["S (seed 0): not started", "S (seed 1): trained, not evaluated", "S (seed 2): waiting for T",
                       "S at 1 step (seed 0): waiting for S", "S at 1 step (seed 1): ready to evaluate",
                       "S at 1 step (seed 2): waiting for S"]
    assert not (tmp_path / "t" / "table.md").exists()  # --status writes nothing
    holder = hold_lock(ablation.run_dir(teacher, 2))
    try:
        assert ablation.status(teacher, 2).startswith(f"running (pid {holder.pid}): training: val/loss 0.012")
    finally:
        holder.kill()
        holder.wait()
    assert ablation.status(teacher, 2).startswith("stopped")  # the lock ends with its process


def test_a_recorded_result_outlives_its_run_folder_and_a_lost_checkpoint_is_named(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    rows = [{"name": "T", "fit": ["teacher.yaml"], "run": str(tmp_path / "runs" / "teacher")},
            {"name": "S", "fit": ["distill_tcd.yaml"], "teacher": "T"}, {"name": "S at 1 step", "checkpoint_of": "S", "evaluate": {"steps": 1}}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "runs" / "t"), "record": str(tmp_path / "records"),
                                    "seeds": 2, "rows": rows, "claims": [{"claim": "S beats T", "better": "S", "than": "T", "columns": ["FVD"]}]}))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    teacher, student = ablation.by_name["T"], ablation.by_name["S"]
    depends_on = {"clips": 4, "frames_per_clip": 16, "resolution": 32, "extractors": {"iqa": "x"}}
    truth = {"IQA": 0.9, "Sync-D": 0.08, "Sync-C": 0.47}

    def train(row, seed):  # a run that logs its held-out loss and keeps a checkpoint
        with SummaryWriter(str(ablation.tensorboard(row, seed))) as writer:
            for step, value in ((24, 0.25 + seed), (49, 0.125 + seed)):  # exact in float32
                writer.add_scalar("val/loss", value, step)
        ablation.last_checkpoint(row, seed).parent.mkdir(parents=True, exist_ok=True)
        ablation.last_checkpoint(row, seed).touch()
        (ablation.run_dir(row, seed) / "trained").touch()

    retrainings = []  # a retraining draws other frames

    def clip(row, seed, key):  # evaluate's sample clip: real frames above generated, 2 frames of 4 px
        return np.full((8, 8, 3), 10 * [teacher, student].index(row) + seed + key + 100 * len(retrainings), np.uint8)

    def evaluate(row, seed):  # writes two sample clips, as evaluate does, beside its result
        for key in (1, 0):
            png = ablation.run_dir(row, seed) / ablate.EVAL_JSON.replace(".json", f"-strict-{key:06d}.png")
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(clip(row, seed, key)).save(png)
        return {**result(seed, 2.0 if row is teacher else 1.0), "depends_on": depends_on, "ground_truth": truth}

    monkeypatch.setattr(ablation, "train", train)
    monkeypatch.setattr(ablation, "evaluate", evaluate)
    for row in (teacher, student):
        for seed in (0, 1):
            ablation.run_row(row, seed)
    # each record keeps the first sample clip, for frames.png
    assert sorted(p.name for p in (tmp_path / "records" / "t" / "S").iterdir()) == [
        "seed0-strict-000000.png", "seed0.json", "seed1-strict-000000.png", "seed1.json"]
    assert (tmp_path / "records" / "teacher" / "seed1.json").exists()  # under the tables' folder: runs/
    record = json.loads((tmp_path / "records" / "t" / "S" / "seed0.json").read_text())
    assert record["metrics"]["FVD"] == 1.0 and record["held_out_loss"] == [[24, 0.25], [49, 0.125]]

    (tmp_path / "records" / "teacher" / "seed1.json").unlink()  # a result from before `record` was set ...
    ablation.write_outputs()
    assert json.loads((tmp_path / "records" / "teacher" / "seed1.json").read_text())["held_out_loss"][0] == [24, 1.25]
    shutil.rmtree(tmp_path / "runs")  # the machine is lost: run folders, checkpoints, TensorBoard events
    monkeypatch.setattr(ablation, "train", lambda *args: pytest.fail("retrained a recorded row"))
    assert ablation.run_row(teacher, 0)["metrics"]["FVD"] == 2.0  # finished: skipped
    assert f"finished earlier ({tmp_path / 'records' / 'teacher' / 'seed0.json'}), skipped" in capsys.readouterr().out
    assert ablation.status(student, 1) == f"finished (recorded in {tmp_path / 'records' / 't' / 'S' / 'seed1.json'}; " \
                                          "its run folder is gone)"
    ablation.write_outputs()
    table = (tmp_path / "runs" / "t" / "table.md").read_text()
    assert "| S beats T |  |  |  | holds |  |  | holds |" in table  # both seeds of S beat both of T on FVD
    assert (tmp_path / "runs" / "t" / "losses.png").exists()  # the curves come from the records
    ablation.run_dir(teacher, 0).mkdir(parents=True)  # a queue's job folder, its training not begun
    assert ablation.status(teacher, 0).endswith("; its run folder holds no training)")
    ablation.tensorboard(teacher, 0).mkdir(parents=True)  # its retraining begun: no validation yet
    assert ablation.held_out_loss(teacher, 0) == [[24, 0.25], [49, 0.125]]  # the recorded result's curve
    assert ablation.status(teacher, 0).endswith("; its run folder holds a retraining, which resumes once that "
                                                "record is deleted)")
    assert (tmp_path / "runs" / "t" / "frames.png").exists()  # and the frames
    (tmp_path / "records" / "teacher" / "seed0-strict-000000.png").unlink()  # a row whose seed 0 kept no clip
    strips = ablation.frame_strips(ablation.results())  # is shown at its next seed, named, and so is S:
    assert [label for label, _ in strips] == ["real", "T (seed 1)", "S (seed 1)"]  # beside the teacher it distils
    assert [frames[0, 0, 0, 0] for _, frames in strips] == [1, 1, 11]
    (tmp_path / "records" / "t" / "S" / "seed1-strict-000000.png").unlink()  # no seed kept by both: each its own
    assert [(label, frames[0, 0, 0, 0]) for label, frames in ablation.frame_strips(ablation.results())] == [
        ("real", 1), ("T (seed 1)", 1), ("S", 10)]
    with pytest.raises(FileNotFoundError, match=r"its result is recorded in .*seed0.json, but its run folder and "
                                                r"checkpoint are gone: delete that record and run 'S' at seed 0 again"):
        ablation.run_row(ablation.by_name["S at 1 step"], 0)
    assert ablation.status(ablation.by_name["S at 1 step"], 0) == (  # not a bare "waiting for S": S never trains
        f"waiting for S (its result is recorded in {tmp_path / 'records' / 't' / 'S' / 'seed0.json'}, but its run "
        "folder and checkpoint are gone: delete that record and run 'S' at seed 0 again to retrain it)")
    (tmp_path / "records" / "t" / "S" / "seed0.json").unlink()  # as told: S trains again
    monkeypatch.setattr(ablation, "train", train)
    retrainings.append(student)
    ablation.run_row(student, 0)
    kept = np.asarray(Image.open(tmp_path / "records" / "t" / "S" / "seed0-strict-000000.png"))
    assert kept[0, 0, 0] == 110  # its record's clip is the retraining's, not the lost run's


def test_a_result_names_its_checkpoint_and_the_ones_it_was_built_on_by_sha256(tmp_path, monkeypatch):
    import hashlib

    rows = [{"name": "T", "fit": ["teacher.yaml"]}, {"name": "S", "fit": ["distill_tcd.yaml"], "teacher": "T"},
            {"name": "S at 1 step", "checkpoint_of": "S", "evaluate": {"steps": 1}}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "runs" / "t"), "record": str(tmp_path / "records"),
                                    "seeds": 2, "rows": rows}))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    weights = {(name, seed): f"{name} trained at seed {seed}".encode() for name in ("T", "S") for seed in (0, 1)}
    sha = {key: hashlib.sha256(data).hexdigest() for key, data in weights.items()}

    def train(row, seed):
        ablation.last_checkpoint(row, seed).parent.mkdir(parents=True, exist_ok=True)
        ablation.last_checkpoint(row, seed).write_bytes(weights[row["name"], seed])
        (ablation.run_dir(row, seed) / "trained").touch()

    monkeypatch.setattr(ablation, "train", train)
    truth = {"IQA": 0.9, "Sync-D": 0.08, "Sync-C": 0.47}
    depends_on = {"clips": 4, "frames_per_clip": 16, "resolution": 32}
    monkeypatch.setattr(ablation, "evaluate", lambda row, seed: {**result(seed, 1.0), "ground_truth": truth,
                                                                 "depends_on": depends_on})
    for name in ("T", "S", "S at 1 step"):
        for seed in (0, 1):
            ablation.run_row(ablation.by_name[name], seed)
    records = {(name, seed): json.loads(ablation.record_path(ablation.by_name[name], seed).read_text())
               for name in ("T", "S", "S at 1 step") for seed in (0, 1)}
    assert records["T", 1]["checkpoint_sha256"] == sha["T", 1] and records["T", 1]["built_on"] == {}
    assert records["S", 1]["checkpoint_sha256"] == sha["S", 1] and records["S", 1]["built_on"] == {"T": sha["T", 1]}
    assert records["S at 1 step", 0]["checkpoint_sha256"] == sha["S", 0]
    assert records["S at 1 step", 0]["built_on"] == {"S": sha["S", 0]}
    shutil.rmtree(tmp_path / "runs")  # the checkpoint is gone, its recorded identity is not
    assert ablation.checkpoint_identity(ablation.by_name["T"], 0) == sha["T", 0]

    shards = tmp_path / "step000600.ckpt"  # a sharded checkpoint: its file names count, as its bytes do
    (shards / "model").mkdir(parents=True)
    (shards / "model" / "0.distcp").write_bytes(b"ab")
    before = ablate.checkpoint_sha256(shards)
    (shards / "model" / "0.distcp").rename(shards / "model" / "1.distcp")
    assert ablate.checkpoint_sha256(shards) != before


def test_keep_checkpoints_used_leaves_the_evaluated_checkpoint_and_last_once_a_row_is_evaluated(tmp_path, monkeypatch):
    rows = [{"name": "T", "fit": ["teacher.yaml"]}, {"name": "S", "fit": ["distill_tcd.yaml"], "teacher": "T"}]
    spec = {"name": "t", "out": str(tmp_path / "t"), "rows": rows, "keep_checkpoints": "used"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    kept = {"T": ["last.ckpt", "step000250.ckpt", "step000500.ckpt"], "S": ["best.ckpt", "last.ckpt", "step000200.ckpt"]}

    def train(row, seed):
        folder = ablation.last_checkpoint(row, seed).parent
        folder.mkdir(parents=True)
        for name in kept[row["name"]]:
            (folder / name).touch()
        (folder / "step000600.ckpt").mkdir()  # a sharded checkpoint is a folder
        (ablation.run_dir(row, seed) / "trained").touch()

    def evaluate(row, seed):  # the evaluated checkpoint, and every checkpoint the next row needs, is still there
        assert len(list(ablation.last_checkpoint(row, seed).parent.glob("*.ckpt"))) == 4
        return {**result(seed, 1.0), "ground_truth": {"IQA": 0.9, "Sync-D": 0.08, "Sync-C": 0.47},
                "depends_on": {"clips": 4, "frames_per_clip": 16, "resolution": 32, "extractors": {"iqa": "x"}}}

    monkeypatch.setattr(ablation, "train", train)
    monkeypatch.setattr(ablation, "evaluate", evaluate)
    for row in rows:
        ablation.run_row(ablation.by_name[row["name"]], 0)
    assert sorted(p.name for p in ablation.last_checkpoint(ablation.by_name["T"], 0).parent.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in ablation.last_checkpoint(ablation.by_name["S"], 0).parent.iterdir()) == [
        "best.ckpt", "last.ckpt"]
    path.write_text(yaml.safe_dump({**spec, "keep_checkpoints": "best"}))
    with pytest.raises(ValueError, match="keep_checkpoints is 'all' .* or 'used' .*, not 'best'"):
        ablate.load_ablation(path)


def test_a_record_needs_every_run_folder_under_the_tables_folder(tmp_path):
    spec = {"name": "t", "out": str(tmp_path / "runs" / "t"), "record": str(tmp_path / "records"), "seeds": 1,
            "claims": [], "quick": ["T"], "rows": [{"name": "T", "fit": ["teacher.yaml"], "run": str(tmp_path / "elsewhere"), "seeds": 1}]}
    with pytest.raises(ValueError, match=r"row 'T': its run folder .*elsewhere/seed0 is not under .*runs, .* `record`"):
        ablate.Ablation(spec)
    assert ablate.Ablation(spec, quick=True).records is None  # a first look records nothing


HOLD_LOCK = """
import fcntl, os, sys, time
f = open(os.path.join(sys.argv[1], "running.lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0); f.write(str(os.getpid())); f.flush()
print("locked", flush=True)
time.sleep(60)
"""


def hold_lock(folder):
    """A process holding `folder`'s run lock, as a running `fada ablate` does, until killed."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_row_running_in_another_process_is_not_run_twice(tmp_path, monkeypatch):
    """Tables share run folders (Teacher A is in every table): a second process on the same row and seed stops
    with a clear error instead of training into the folder beside the first."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "t"), "rows": [{"name": "T", "fit": ["teacher.yaml"]}]}))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    row = ablation.by_name["T"]
    monkeypatch.setattr(ablate.Ablation, "train", lambda *args: pytest.fail("trained beside a running process"))
    holder = hold_lock(ablation.run_dir(row, 0))
    try:
        with pytest.raises(ablate.RunInProgress, match=rf"row T \(seed 0\) is running in another process \(pid {holder.pid},"):
            ablation.run_row(row, 0)
        with pytest.raises(SystemExit, match="is running in another process"):
            ablate.main(["--config", str(path)])
    finally:
        holder.kill()
        holder.wait()
    trained = []
    monkeypatch.setattr(ablate.Ablation, "train", lambda self, row, seed: trained.append(seed))
    evaluated = {**result(0, 1.0), "ground_truth": {"IQA": 0.9, "Sync-D": 0.08, "Sync-C": 0.47},
                 "depends_on": {"clips": 4, "frames_per_clip": 16, "resolution": 32}}
    monkeypatch.setattr(ablate.Ablation, "evaluate", lambda *args: evaluated)
    monkeypatch.setattr(ablate.curve, "training_seconds", lambda run: 1.0)
    ablation.run_row(row, 0)  # the holder is gone: its lock with it
    assert trained == [0] and ablation.result(row, 0)["metrics"] == evaluated["metrics"]


FAKE_JOB = """
import json, sys, time
from pathlib import Path
folder, events, name, seed, fail = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
with open(events, "a") as f:
    f.write(json.dumps(["start", name, int(seed), time.monotonic()]) + "\\n")
time.sleep(0.4)
with open(events, "a") as f:  # before `trained`, which lets the runs that need this one start
    f.write(json.dumps(["end", name, int(seed), time.monotonic()]) + "\\n")
if not fail:
    (folder / "trained").touch()
    (folder / "result.json").write_text(sys.argv[6] if len(sys.argv) > 6 else "{}")
sys.exit(3 if fail else 0)
"""


def test_jobs_run_side_by_side_each_once_the_models_it_needs_are_trained(tmp_path, monkeypatch, capsys):
    rows = [{"name": "T", "fit": ["teacher.yaml"]}, {"name": "S", "fit": ["distill_tcd.yaml"], "teacher": "T"},
            {"name": "R", "fit": ["distill_rflow.yaml"], "teacher": "T"},
            {"name": "S at 1 step", "checkpoint_of": "S", "evaluate": {"steps": 1}},
            {"name": "S at 1 step, twin", "checkpoint_of": "S", "evaluate": {"steps": 1}},  # waits for the first
            {"name": "U", "fit": ["teacher.yaml"]}]  # needs nothing: ready from the start
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "t"), "seeds": 2, "rows": rows}))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    events = tmp_path / "events.jsonl"
    fails = {("T", 1)}  # seed 1's teacher fails: its students at seed 1 must not start

    def fake(row, seed, config):
        return [sys.executable, "-c", FAKE_JOB, str(ablation.run_dir(row, seed)), str(events), row["name"], str(seed),
                "1" if (row["name"], seed) in fails else "0"]

    monkeypatch.setattr(ablation, "job_command", fake)
    failed = ablate.run_jobs([ablate.Job(ablation, str(path), row, seed) for row in ablation.rows for seed in (0, 1)],
                             jobs=2, poll=0.05)
    assert sorted(failed) == ["R (seed 1)", "S (seed 1)", "S at 1 step (seed 1)", "S at 1 step, twin (seed 1)",
                              "T (seed 1)"]
    log = [json.loads(line) for line in events.read_text().splitlines()]
    when = {(kind, name, seed): t for kind, name, seed, t in log}
    assert {(name, seed) for kind, name, seed, _ in log if kind == "start"} == {
        ("T", 0), ("T", 1), ("S", 0), ("R", 0), ("S at 1 step", 0), ("U", 0), ("U", 1), ("S at 1 step, twin", 0)}
    for name, need in [("S", "T"), ("R", "T"), ("S at 1 step", "S"), ("S at 1 step, twin", "S at 1 step")]:
        assert when["start", name, 0] >= when["end", need, 0]
    running = max(sum(1 for k, n, s, t in log if k == "start" and t <= moment) -
                  sum(1 for k, n, s, t in log if k == "end" and t <= moment) for *_, moment in log)
    assert running == 2  # up to 4 are ready at once (T and U at two seeds); never more than --jobs
    out = capsys.readouterr().out
    assert "S (seed 1): not run: it needs T at seed 1, which did not train" in out
    assert "T (seed 1): failed (exit 3), see " in out and str(ablation.run_dir(rows[0], 1) / "ablate.log") in out


def test_a_job_that_builds_on_a_trained_model_starts_before_one_that_trains_from_scratch(tmp_path, monkeypatch):
    rows = [{"name": "T", "fit": ["teacher.yaml"]}, {"name": "U", "fit": ["teacher.yaml"]},
            {"name": "S", "fit": ["distill_tcd.yaml"], "teacher": "T"}, {"name": "R", "fit": ["distill_rflow.yaml"],
            "teacher": "T"}, {"name": "S1", "checkpoint_of": "S", "evaluate": {"steps": 1}}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "t"), "seeds": 2, "rows": rows}))
    ablation = ablate.Ablation(ablate.load_ablation(path))
    events = tmp_path / "events.jsonl"

    def fake(row, seed, config):
        return [sys.executable, "-c", FAKE_JOB, str(ablation.run_dir(row, seed)), str(events), row["name"], str(seed), "0"]

    monkeypatch.setattr(ablation, "job_command", fake)
    trained_u = ablation.run_dir(rows[1], 1)  # U at seed 1 trained, not yet evaluated: a queue killed in between
    trained_u.mkdir(parents=True)
    (trained_u / "trained").touch()
    queue = [ablate.Job(ablation, str(path), row, seed) for row in ablation.rows for seed in (0, 1)]  # T T U U S S R R ..
    assert ablate.run_jobs(queue, jobs=1, poll=0.05) == []
    starts = [(name, seed) for kind, name, seed, _ in map(json.loads, events.read_text().splitlines()) if kind == "start"]
    # U's evaluation at seed 1 first; S1 (an evaluation of S) before R (a training on T), though R comes
    # first in the queue
    assert starts == [("U", 1), ("T", 0), ("S", 0), ("S1", 0), ("R", 0), ("T", 1), ("S", 1), ("S1", 1), ("R", 1),
                      ("U", 0)]


QUEUE = """
import sys
from fada_lightning import ablate
path, pid_file = sys.argv[1], sys.argv[2]
ablation = ablate.Ablation(ablate.load_ablation(path))
ablation.job_command = lambda row, seed, config: [sys.executable, "-c", "import os, signal, sys, time; "
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(open(sys.argv[1] + '.how', 'w').write('SIGTERM'))); "
    "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)", pid_file]
ablate.run_jobs([ablate.Job(ablation, path, ablation.rows[0], 0)], jobs=2, poll=0.05)
"""


@pytest.mark.parametrize("how", ["kill", "Ctrl-C"])
def test_killing_the_queue_stops_its_runs(tmp_path, how):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "t"), "rows": [{"name": "T", "fit": ["teacher.yaml"]}]}))
    pid_file = tmp_path / "run.pid"
    queue = subprocess.Popen([sys.executable, "-c", QUEUE, str(path), str(pid_file)], stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # a terminal of its own: Ctrl-C goes to its process group
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    run = int(pid_file.read_text())
    if how == "kill":
        queue.terminate()  # SIGTERM to the queue alone
        assert queue.wait(timeout=60) == 1
        assert "stopped by signal 15; each run resumes from its last checkpoint" in queue.stderr.read()
    else:  # SIGINT to the whole foreground group: the run is in a session of its own, so the queue stops it
        os.killpg(queue.pid, signal.SIGINT)
        queue.wait(timeout=60)
    assert (tmp_path / "run.pid.how").read_text() == "SIGTERM"  # which a training run saves at (FinalCheckpoint)
    with pytest.raises(ProcessLookupError):  # the queue waited for its run, so nothing is left, not even a zombie
        os.kill(run, 0)


def test_several_tables_run_as_one_queue_and_the_run_folder_they_share_trains_once(tmp_path, monkeypatch, capsys):
    teacher = {"name": "T", "fit": ["teacher.yaml"], "run": str(tmp_path / "runs" / "teacher")}  # in both tables
    configs = []
    for name, student in (("one", "A"), ("two", "B")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "out": str(tmp_path / "runs" / name), "rows": [
            teacher, {"name": student, "fit": ["distill_tcd.yaml"], "teacher": "T"}]}))
        configs += ["--config", str(path)]
    events = tmp_path / "events.jsonl"
    done = json.dumps({**result(0, 1.0), "threads": 1, "ground_truth": {"IQA": 0.9, "Sync-D": 0.08, "Sync-C": 0.47},
                       "depends_on": {"clips": 4, "frames_per_clip": 16, "resolution": 32, "extractors": {"iqa": "x"}}})

    def fake(self, row, seed, config):
        return [sys.executable, "-c", FAKE_JOB, str(self.run_dir(row, seed)), str(events), row["name"], str(seed), "0", done]

    monkeypatch.setattr(ablate.Ablation, "job_command", fake)
    monkeypatch.setattr(ablate.run_jobs, "__defaults__", (0.05,))  # poll
    ablate.main([*configs, "--status"])
    assert capsys.readouterr().out.splitlines() == ["T (seed 0): not started", "A (seed 0): waiting for T",
                                                    "B (seed 0): waiting for T"]  # T once
    written = ablate.main([*configs, "--jobs", "2"])
    log = [json.loads(line) for line in events.read_text().splitlines()]
    assert [name for kind, name, *_ in log if kind == "start"].count("T") == 1
    when = {(kind, name): t for kind, name, _, t in log}
    assert when["start", "A"] >= when["end", "T"] and when["start", "B"] >= when["end", "T"]
    assert written[-1] == tmp_path / "runs" / "claims.md"
    assert all((tmp_path / "runs" / name / "table.md").exists() for name in ("one", "two"))
    with pytest.raises(SystemExit, match="no seed \\[1\\] in ablation 'one'"):  # which table lacks the seed
        ablate.main([*configs, "--seed", "1", "--status"])


def test_evaluate_counts_nfe_as_the_samplers_do_and_records_what_the_numbers_depend_on(teacher_ckpt, tmp_path):
    from fada_lightning.metrics import synthetic

    evaluator = evaluate.VideoEvaluator(*(getattr(synthetic, role)() for role in
                                          ("WorldFrames", "WorldVideo", "WorldExpression", "WorldQuality", "WorldSync")))
    # held-out clips only: the world's training tiers as small as they go (the defaults render 768 clips)
    data = {"synthetic": {"root": str(tmp_path / "data"), "strict_clips": 4, "lenient_clips": 0, "clips_per_shard": 4,
                          "size": 32, "progress": False}}
    common = dict(clips=3, frames=8, batch_size=3, data=data, videos=1, progress=False)
    full = evaluate.evaluate(teacher_ckpt, evaluator, steps=2, out=str(tmp_path / "full.json"), **common)
    one_pass = evaluate.evaluate(teacher_ckpt, evaluator, steps=2, ref_scale=1.0, audio_scale=1.0,
                                 out=str(tmp_path / "s1.json"), **common)
    assert full["metrics"]["NFE-D"] == 2 * 3 and one_pass["metrics"]["NFE-D"] == 2 * 3  # Eq 9: three passes a step
    saved = json.loads((tmp_path / "full.json").read_text())
    assert set(saved["metrics"]) >= set(evaluate.COLUMNS)
    depends = saved["depends_on"]
    assert (depends["clips"], depends["frames_per_clip"], depends["resolution"]) == (3, 8, 32)
    assert depends["sampler"]["steps"] == 2 and depends["sampler"]["ref_scale"] == 2.5
    assert set(depends["extractors"]) == {"frame_features", "video_features", "expression", "quality", "sync"}
    assert len(saved["per_clip"]) == 3 and list((tmp_path).glob("full-*.mp4"))
    from PIL import Image

    (png,) = tmp_path.glob("full-*.png")  # lossless: real frames above generated ones, 8 frames of 32 px
    assert Image.open(png).size == (8 * 32, 2 * 32)


def quick_spec(tmp_path) -> dict:
    data = {"root": str(tmp_path / "data"), "strict_clips": 8, "lenient_clips": 0, "clips_per_shard": 4,
            "frames": 20, "size": 32, "progress": False}
    tiny = {"data.init_args.synthetic": data, "data.init_args.val_samples": 2, "trainer.limit_val_batches": 1,
            "model.init_args.clip_frames": 4}
    return {"name": "tiny", "out": str(tmp_path / "ablation"), "eval_overrides": {"data": {"synthetic": {"root": str(tmp_path / "data")}}},
            "seeds": 2,
            "rows": [{"name": "Teacher", "fit": ["teacher.yaml"], "overrides": {**tiny, "model.init_args.sample_steps": 2},
                      "reference": True},
                     {"name": "Student", "fit": ["distill_perflow.yaml"], "teacher": "Teacher",
                      "overrides": {**{k: v for k, v in tiny.items() if k != "model.init_args.clip_frames"},
                                    # 2 windows of 1 step each: 6 NFE, the teacher's, so two seeds cost what one did
                                    **{f"model.init_args.distiller.init_args.{k}": 1 if k == "solver_steps" else 2
                                       for k in ("solver_steps", "num_windows", "sample_steps")}}}],
            "sweep": {"model": "Student", "fixed": {"ref_scale": 2.0, "audio_scale": 6.5}, "audio_scale": [1.0, 6.5]},
            "claims": [{"claim": "s_a 6.5 beats s_a 1", "better": "Student s_a=6.5", "than": "Student s_a=1"}],
            "quick": ["Teacher", "Student", "Student s_a=1", "Student s_a=6.5"]}


@pytest.mark.slow
def test_ablate_quick_runs_two_seeds_end_to_end_and_resumes_after_its_first_row_then_two_jobs_at_once(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(quick_spec(tmp_path)))
    seeds = ["--seed", "0", "--seed", "1"]
    ablate.main(["--config", str(path), "--quick", "--row", "Teacher", *seeds])
    out = tmp_path / "ablation-quick"
    first = out / "Teacher" / "seed1" / "result.json"
    stamp = first.stat().st_mtime_ns
    assert "Not finished yet: Student" in (out / "table.md").read_text()

    ablate.main(["--config", str(path), "--quick", "--jobs", "2", *seeds])  # picks up where the first call stopped,
    # two runs at a time, each its own process
    assert "Teacher (seed 1): finished earlier" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp
    table = (out / "table.md").read_text()
    names = ("Teacher", "Student", "Student s_a=1", "Student s_a=6.5")
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert all(lines[name].endswith(" | 6 | 2 |") and " ± " in lines[name] for name in names)  # 6 steps, 2 seeds
    results = [json.loads((out / row / f"seed{s}" / "result.json").read_text()) for row in ("Teacher", "Student_s_a_1")
               for s in (0, 1)]
    assert all(r["seconds_train"] > 0 for r in results[:2]) and all(r["seconds_train"] == 0 for r in results[2:])
    assert all(r["seconds_eval"] > 0 and r["threads"] >= 1 for r in results)
    assert all(len(r["train_threads"]) == 1 for r in results[:2]) and "train_threads" not in results[2]
    assert "Wall time of these runs on this machine: training " in table
    claim = next(line for line in table.splitlines() if line.startswith("| s_a 6.5 beats s_a 1 |"))
    assert claim.count(" | ") == len(ablate.QUALITY) + 1 and claim.split(" | ")[-1].removesuffix(" |") in (
        ablate.HOLDS, ablate.FAILS, ablate.UNDECIDED, "in part")
    assert (out / "losses.png").read_bytes()[:4] == b"\x89PNG"  # Teacher and Student, a line per seed
    header, *rows = (out / "table.csv").read_text().strip().splitlines()
    assert header.startswith("Method,seed,NFE-D,IQA,Sync-D,Sync-C,FVD,FID,E-FID")
    assert sorted(line.split(",")[:2] for line in rows) == sorted([name, s] for name in names for s in "01")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == list(names) and summary["Student"]["seeds"] == [0, 1]
    assert summary["Student"]["FVD"]["values"] == [json.loads((out / "Student" / f"seed{s}" / "result.json").read_text())
                                                   ["metrics"]["FVD"] for s in (0, 1)]
    assert json.loads((out / "Student_s_a_1" / "seed1" / "result.json").read_text())[
        "depends_on"]["sampler"]["audio_scale"] == 1.0
    assert (out / "sweep_audio_scale.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Student | s_a |" in (out / "best_scale.md").read_text()
    # frames.png: real, Teacher, Student (not the sweep rows): 16 frames of 32 px, every 2nd, each at 4 x 32 px
    frame_px = 4 * 32
    assert Image.open(out / "frames.png").size == (ablate.LABEL_PX + 16 // ablate.FRAME_STRIDE * frame_px,
                                                   3 * (frame_px + ablate.STRIP_GAP_PX))

    # the table alone, from finished runs; a seed gone is a partially finished row
    (out / "Student_s_a_6.5" / "seed1" / "result.json").rename(tmp_path / "gone.json")
    ablate.main(["--config", str(path), "--quick", "--collect", *seeds])
    assert "finished earlier" not in capsys.readouterr().out
    assert "Partially finished: Student s_a=6.5 (1 of 2 seeds)." in (out / "table.md").read_text()
    assert json.loads((out / "summary.json").read_text())["Student s_a=6.5"]["seeds"] == [0]
